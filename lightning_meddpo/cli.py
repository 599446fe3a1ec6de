"""Command-line entry point: `python -m lightning_meddpo fit|validate|test|predict --config ...`
and the extra subcommands (build-pairs, convert, export, benchmark).

Lightning and the model code are imported only for the LightningCLI subcommands, so the data and
conversion tools start in a second instead of importing the whole training stack.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings

# Subcommands beside LightningCLI's fit/validate/test/predict: name -> "module:function(argv)".
EXTRA_COMMANDS = {
    "build-pairs": "lightning_meddpo.data.pairs:main",
    "convert": "lightning_meddpo.backbones.convert:main",
    "export": "lightning_meddpo.export:main",
    "benchmark": "lightning_meddpo.eval.benchmark:main",
}


def run_extra_command(name: str, argv: list[str]) -> object:
    """Import the subcommand's module lazily and run it."""
    module_name, function = EXTRA_COMMANDS[name].split(":")
    return getattr(importlib.import_module(module_name), function)(argv)


def main(args: list[str] | None = None) -> object:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in EXTRA_COMMANDS:
        return run_extra_command(argv[0], argv[1:])
    # The frozen reference model is in eval mode on purpose; Lightning's warning about it is noise.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    from lightning_meddpo.lightning_cli import run_lightning_cli

    return run_lightning_cli(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
