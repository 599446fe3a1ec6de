"""Command-line entry point: `python -m lightning_meddpo fit|validate|test|predict --config ...`
and the extra subcommands (build-pairs, convert, export, benchmark).

Every subcommand parses its options with jsonargparse (`--help`, and `--config` / `--print_config` where a
subcommand takes options from a file). The LightningCLI subclass (lightning_cli.py) and the other commands'
modules are imported only when their subcommand runs: build-pairs starts in 0.1 s, not the 4.5 s that
importing Lightning's CLI and the model code costs.

A data, config or checkpoint problem ends the run with one message naming what to fix (exit status 2),
not a traceback; `--debug` (or LIGHTNING_MEDDPO_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings

# Subcommands beside LightningCLI's fit/validate/test/predict: name -> (the module whose main(argv) runs it,
# what it does).
EXTRA_COMMANDS = {
    "build-pairs": ("lightning_meddpo.commands.build_pairs", "build text- and image-rejected preference pairs"),
    "convert": ("lightning_meddpo.commands.convert", "convert an original LLaVA-layout checkpoint (LLaVA-Med, HuatuoGPT-Vision)"),
    "export": ("lightning_meddpo.commands.export", "export a checkpoint's policy as a Hugging Face model directory"),
    "benchmark": ("lightning_meddpo.commands.benchmark", "fit and test a grid of formulations and compare them"),
}
LIGHTNING_COMMANDS = {
    "fit": "train a formulation (--config configs/methods/<m>.yaml --config configs/backbones/<b>.yaml)",
    "validate": "the validation metrics of a checkpoint",
    "test": "generate and score answers (--data configs/eval/vqa.yaml) or test preference metrics",
    "predict": "generate answers only",
}
DEBUG_ENV = "LIGHTNING_MEDDPO_DEBUG"
# What a user's input can raise: printed as one message. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FloatingPointError, PermissionError)
# Lightning messages that say nothing to our users (the reference is in eval mode on purpose, and so on).
QUIET = (
    r"Found \d+ module\(s\) in eval mode",
    r".*isinstance\(treespec, LeafSpec\)",
    r"LightningCLI's args parameter is intended to run from within Python",
    r"You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a `LightningDataModule`",
    r"`training_step` returned `None`",
)


def run_extra_command(name: str, argv: list[str]) -> object:
    """Import the subcommand's module lazily and run its main(argv)."""
    return importlib.import_module(EXTRA_COMMANDS[name][0]).main(argv)


def overview() -> str:
    lines = ["usage: python -m lightning_meddpo SUBCOMMAND [options]   (SUBCOMMAND --help for its options)", "",
             "subcommands:"]
    lines += [f"  {name:<12} {what}" for name, what in LIGHTNING_COMMANDS.items()]
    lines += [f"  {name:<12} {what}" for name, (_, what) in EXTRA_COMMANDS.items()]
    lines += ["", f"--debug (or {DEBUG_ENV}=1): show the traceback of an error"]
    return "\n".join(lines)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_lightning() -> None:
    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())


def main(args: list[str] | None = None) -> object:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if args is None else list(args)
    debug = "--debug" in argv or bool(os.environ.get(DEBUG_ENV))
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        return None
    try:
        if argv[0] in EXTRA_COMMANDS:
            return run_extra_command(argv[0], argv[1:])
        quiet_lightning()
        from lightning_meddpo.lightning_cli import run_lightning_cli

        return run_lightning_cli(argv)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"lightning_meddpo {argv[0]}: error: {e}\n(the full traceback: add --debug, or set {DEBUG_ENV}=1)",
              file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main(sys.argv[1:])
