"""The LightningCLI subclass behind fit / validate / test / predict.

The module is chosen by class_path (SFT, DPO, ...); the DataModule by class_path too. The model's
processor is linked into the DataModule at instantiation, so data and model always agree on the
tokenizer and image preprocessing.
"""

from __future__ import annotations

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


def run_lightning_cli(argv: list[str]) -> MedDPOCLI:
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
