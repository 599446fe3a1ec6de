"""LightningCLI entry point: `python -m lightning_meddpo fit|validate|test --config ...`.

The module is chosen by class_path (SFT, DPO, ...); the DataModule by class_path too. The model's
processor is linked into the DataModule at instantiation, so data and model always agree on the
tokenizer and image preprocessing.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from lightning_meddpo.modules.base import PreferenceModule

# Logger and checkpointing live in the configs (configs/*/base_trainer.yaml) so they stay configurable;
# without a config, Lightning's own defaults (TensorBoard) write under runs/.
TRAINER_DEFAULTS = {"default_root_dir": "runs"}


def run_name(config_files: list) -> str:
    """`configs/demo/dpo.yaml` -> `demo/dpo`: runs of different configs never share a log directory."""
    if not config_files:
        return "default"
    path = Path(str(config_files[-1]))
    return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem


class MedDPOCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.processor", "data.init_args.processor", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """A TensorBoard logger named `auto` is named after the config file (see run_name)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        logger = config.trainer.get("logger")
        init_args = getattr(logger, "init_args", None)
        if init_args is not None and getattr(init_args, "name", None) == "auto":
            paths = [p for p in (config.get("config") or []) if "strategies" not in str(p)]
            init_args.name = run_name(paths)


# Subcommands beside LightningCLI's fit/validate/test/predict: name -> "module:function(argv)".
EXTRA_COMMANDS = {
    "build-pairs": "lightning_meddpo.data.pairs:main",
    "convert": "lightning_meddpo.backbones.convert:main",
    "export": "lightning_meddpo.export:main",
    "benchmark": "lightning_meddpo.eval.benchmark:main",
}


def run_extra_command(name: str, argv: list[str]) -> object:
    """Import the subcommand's module lazily (keeps `fit` start-up lean) and run it."""
    module_name, function = EXTRA_COMMANDS[name].split(":")
    return getattr(importlib.import_module(module_name), function)(argv)


def main(args: list[str] | None = None) -> MedDPOCLI | object:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in EXTRA_COMMANDS:
        return run_extra_command(argv[0], argv[1:])
    return MedDPOCLI(
        PreferenceModule,
        None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=argv,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
