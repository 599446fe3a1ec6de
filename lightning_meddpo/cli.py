"""Command-line entry point: `python -m lightning_meddpo SUBCOMMAND ...`, one jsonargparse parser.

LightningCLI's fit / validate / test / predict train and evaluate a module chosen by class_path (SFT, DPO,
...) on a DataModule chosen by class_path; the model's processor is linked into the DataModule at
instantiation, so data and model always agree on the tokenizer and image preprocessing. The programs in
PROGRAMS (build-pairs, convert, export, benchmark, plan) are subcommands of the same parser: `--help` lists them
all, and each parses its own options (with `--config` / `--print_config` where it takes a file). `python -m
lightning_meddpo` starts the ones that neither train nor evaluate without this module (entry.py: no Lightning
import, `--help` in about a second); through here they cost Lightning's import (about 5 s on 2 CPU cores).

`--ckpt_path` never changes what the user configured: Lightning's CLI would parse the checkpoint's saved
hyper-parameters over the config (a checkpoint could switch on trust_remote_code, swap the backbone, or
silently replace a `--model.init_args.beta` given on the command line). Here the checkpoint is read and
compared instead: one of another module class, backbone, formulation or LoRA setting is refused with an
error naming the difference, and the saved config.yaml states what actually ran. `--ckpt_path last`
resumes the newest run of this config only when that run was trained with the same model settings and the
same data (the files' bytes and the training settings, data/fingerprint.py); `--resume_anyway` resumes it all
the same, with the differences in one warning line. An explicit `--ckpt_path` with other data warns in one line
(mid-epoch the DataModule refuses it, see PreferenceDataModule.load_state_dict).

A data, config or checkpoint problem ends the run with one message naming what to fix (exit status 2),
not a traceback; `--debug` (or LIGHTNING_MEDDPO_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import ActionYesNo
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_meddpo.checkpoints import CheckpointError, read_checkpoint_meta
from lightning_meddpo.commands import benchmark, build_pairs, convert, export, plan
from lightning_meddpo.data.datamodule import PreferenceDataModule
from lightning_meddpo.data.fingerprint import data_differences
from lightning_meddpo.entry import DEBUG_ENV, guarded
from lightning_meddpo.modules.base import PreferenceModule
from lightning_meddpo.modules.settings import upgraded

# Subcommands beside LightningCLI's: each module has build_parser() (its options) and run(namespace).
PROGRAMS = {"build-pairs": build_pairs, "convert": convert, "export": export, "benchmark": benchmark, "plan": plan}
# Lightning messages that say nothing to our users (the reference is in eval mode on purpose, and so on).
QUIET = (
    r"Found \d+ module\(s\) in eval mode",
    r".*isinstance\(treespec, LeafSpec\)",
    r"LightningCLI's args parameter is intended to run from within Python",
    r"You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a `LightningDataModule`",
    r"`training_step` returned `None`",
)

# Logger and checkpointing live in the configs (configs/backbones/*.yaml) so they stay configurable;
# without a config, Lightning's own defaults (TensorBoard) write under runs/.
TRAINER_DEFAULTS = {"default_root_dir": "runs"}
# Hyper-parameters that decide what a checkpoint IS: a different value is another model, not a setting.
IDENTITY = ("backbone", "loss_type", "lora")
OVERLAYS = ("strategies", "data")  # config folders stacked on a run without naming it
RENAMED_BACKBONES = ("demo", "llava_med", "huatuo")  # configs/<backbone>/<formulation>.yaml before configs/backbones/
RENAMED_FOLDERS = {"methods": "formulations"}  # configs/methods/ is configs/formulations/ (one name per concept)
DESCRIPTION = ("Preference optimization of medical vision-language models. `SUBCOMMAND --help` lists its options; "
               f"--debug (or {DEBUG_ENV}=1) shows the traceback of an error.")


def run_name(config_files: list) -> str:
    """`configs/formulations/dpo.yaml` + `configs/backbones/demo.yaml` -> `demo/dpo` (any other single config:
    `<folder>/<stem>`): runs of different configs never share a log directory. Strategy and data overlays
    (configs/strategies/, configs/data/) do not rename a run."""
    paths = [Path(str(p)) for p in config_files if Path(str(p)).parent.name not in OVERLAYS]
    if not paths:
        return "default"
    stacked = {p.parent.name: p.stem for p in paths}
    if "formulations" in stacked:
        return f"{stacked.get('backbones', 'default')}/{stacked['formulations']}"
    path = paths[-1]
    return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem


def config_files(argv: list[str]) -> list[str]:
    """The `--config` files of a command line, in order (`--config F` and `--config=F`)."""
    return [a.split("=", 1)[1] if a.startswith("--config=") else argv[i + 1]
            for i, a in enumerate(argv) if a.startswith("--config=") or (a == "--config" and i + 1 < len(argv))]


def renamed_configs(argv: list[str]) -> list[str]:
    """The command line with a renamed config folder's files under today's name (configs/methods/dpo.yaml ->
    configs/formulations/dpo.yaml), with a deprecation warning; files that exist are left alone."""
    out = list(argv)
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--config=") else arg if i and argv[i - 1] == "--config" else None
        path = Path(value) if value else None
        if path is None or path.exists() or path.parent.name not in RENAMED_FOLDERS:
            continue
        moved = path.parent.parent / RENAMED_FOLDERS[path.parent.name] / path.name
        if moved.exists():
            warnings.warn(f"--config {path}: {path.parent} is now {moved.parent}; reading {moved}", DeprecationWarning,
                          stacklevel=2)
            out[i] = f"--config={moved}" if arg.startswith("--config=") else str(moved)
    return out


def check_config_stack(argv: list[str]) -> None:
    """Two mistakes a stacked run can make, said plainly instead of jsonargparse's errors (or none):

    * a per-backbone config of before (configs/demo/dpo.yaml, ...): name the files that replace it;
    * a backbone before its formulation: the backbone's model settings, read before any class_path, are filled in
      with the base module's defaults, which the formulation's family would then inherit (SFT and the
      reference-free losses would get `reference: copy`). The formulation goes first.
    """
    files = [Path(f) for f in config_files(argv)]
    for path in files:
        if path.exists() or path.parent.name not in RENAMED_BACKBONES or path.suffix != ".yaml":
            continue
        root, backbone = path.parent.parent, path.parent.name
        stack = [root / "formulations" / path.name, root / "backbones" / f"{backbone}.yaml"]
        if backbone == "demo" and path.stem == "targeted":
            stack.append(root / "data" / "demo_targeted.yaml")
        note = (" The formulations carry the paper's hyper-parameters; the demo's own (e.g. beta 0.5) are in "
                "configs/benchmark/demo.yaml." if backbone == "demo" else "")
        raise FileNotFoundError(f"{path}: the per-backbone configs are now a formulation and a backbone stacked: "
                                + " ".join(f"--config {c}" for c in stack) + "." + note)
    folders = [p.parent.name for p in files]
    if "backbones" in folders and "formulations" in folders and folders.index("backbones") < folders.index("formulations"):
        backbone, formulation = files[folders.index("backbones")], files[folders.index("formulations")]
        raise ValueError(f"--config {backbone} comes before --config {formulation}: give the formulation first "
                         f"(--config {formulation} --config {backbone}), or the formulation's module inherits the base "
                         "module's defaults (e.g. reference: copy for SFT)")


def _plain(value: Any) -> Any:
    """Namespaces and dataclasses as dicts, for comparing a config with a checkpoint's hyper-parameters."""
    if hasattr(value, "as_dict"):
        return _plain(value.as_dict())
    if hasattr(value, "__dataclass_fields__"):
        return {k: _plain(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k != "_instantiator"}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_differences(model_config: Any, checkpoint: dict[str, Any], keys: tuple[str, ...] | None = None) -> list[str]:
    """`name: checkpoint value -> configured value` for each hyper-parameter that differs (all of them, or
    `keys`), and the module class."""
    config = _plain(model_config)
    class_path = config.get("class_path", "")
    args = config.get("init_args") or {}
    saved_class = (checkpoint.get("meddpo") or {}).get("module_class", "")
    out = []
    if saved_class and class_path and saved_class.rpartition(".")[2] != class_path.rpartition(".")[2]:
        out.append(f"module class: {saved_class} -> {class_path}")
    args, hparams = upgraded(args), upgraded(_plain(checkpoint.get("hyper_parameters") or {}))  # today's keys
    for key in keys if keys is not None else sorted(set(args) & set(hparams)):
        if key in args and key in hparams and args[key] != hparams[key]:
            out.append(f"{key}: {hparams[key]!r} -> {args[key]!r}")
    return out


def training_data_differences(config: Any, checkpoint: dict[str, Any]) -> list[str]:
    """What differs between the data a checkpoint trained on and the data this config trains on (files' bytes and
    training settings, see data/fingerprint.py); nothing for a DataModule other than ours."""
    data = _plain(config.get("data")) or {}
    if not str(data.get("class_path", "")).endswith(PreferenceDataModule.__name__):
        return []
    saved_state = checkpoint.get(PreferenceDataModule.__qualname__) or {}
    return data_differences(_plain(checkpoint.get("datamodule_hyper_parameters")), saved_state.get("files"),
                            data.get("init_args") or {})


def _warn(message: str) -> None:
    """One line on stderr, once per job (rank 0)."""
    if all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID")):
        print(f"lightning_meddpo: warning: {message}", file=sys.stderr, flush=True)


class MedDPOParser(LightningArgumentParser):
    """LightningCLI's parser, whose subcommands are Lightning's and then the PROGRAMS."""

    def add_subcommands(self, **kwargs: Any):
        subcommands = super().add_subcommands(**kwargs)
        for name, program in PROGRAMS.items():
            parser = program.build_parser()
            subcommands.add_subcommand(name, parser, help=(parser.description or "").split("\n")[0])
        return subcommands


class MedDPOCLI(LightningCLI):
    """fit / validate / test / predict as LightningCLI runs them (with the checks above), and the PROGRAMS:
    a program builds no model, trainer or seed; its run(namespace) is called and its result kept in
    `self.result`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.result: Any = None
        kwargs.setdefault("parser_class", MedDPOParser)
        super().__init__(*args, **kwargs)

    @property
    def program(self):
        """The PROGRAMS module this command line runs, or None for Lightning's subcommands."""
        return PROGRAMS.get(self.subcommand or "")

    def _run_subcommand(self, subcommand: str) -> None:
        if self.program is None:
            return super()._run_subcommand(subcommand)
        self.result = self.program.run(self.config[subcommand])

    def _set_seed(self) -> None:
        if self.program is None:
            super()._set_seed()

    def instantiate_classes(self) -> None:
        if self.program is None:
            super().instantiate_classes()

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.processor", "data.init_args.processor", apply_on="instantiate")
        parser.add_argument("--resume_anyway", action=ActionYesNo, default=False,
                            help="--ckpt_path last: resume the newest run of this config even if it was trained on other "
                                 "data or settings (the differences are printed); data changed mid-epoch then resumes "
                                 "at the next epoch boundary")

    def _parse_ckpt_path(self) -> None:
        """Check `--ckpt_path` against the config instead of applying its hyper-parameters (see module
        docstring); resolve `last` to the run this config means."""
        subcommand = self.config.get("subcommand")
        if subcommand not in self.subcommands():  # none, or a program (export's --ckpt_path is its own)
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path:
            return
        resolved_last = ckpt_path == "last"
        if resolved_last:
            resolved = self._last_of_this_config(config, compare_data=subcommand == "fit")
            if resolved is None:
                return  # nothing to resume: Lightning starts anew (and says so)
            config.ckpt_path = ckpt_path = str(resolved)
        checkpoint = read_checkpoint_meta(ckpt_path)
        differences = config_differences(config.model, checkpoint, IDENTITY)
        if differences:
            raise CheckpointError(
                f"{ckpt_path} was trained as another model than this config describes: " + "; ".join(differences)
                + ". Use a checkpoint of this model, or the config it was trained with (its run's config.yaml)."
            )
        if subcommand == "fit" and not resolved_last:
            differences = training_data_differences(config, checkpoint)
            if differences:
                _warn(f"resuming {ckpt_path}, which was trained on other data: " + "; ".join(differences))

    def _last_of_this_config(self, config, compare_data: bool) -> Path | None:
        """The newest last.ckpt among this config's runs, if it was trained with this config's model settings
        and (for `fit`, which continues it) data (data/fingerprint.py); a run with other settings or data is not
        resumed by `last`: an error names the differences and says how to resume it anyway (`--resume_anyway`, or
        its path) or start anew. validate / test may evaluate it on any data."""
        logger = config.trainer.get("logger")
        init_args = getattr(logger, "init_args", None) if logger is not None else None
        if init_args is None or not getattr(init_args, "save_dir", None):
            return None
        name = self._logger_name(config, init_args)
        found = sorted((Path(init_args.save_dir) / name).glob("*/checkpoints/last*.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            return None
        newest = found[-1]
        checkpoint = read_checkpoint_meta(newest)
        differences = config_differences(config.model, checkpoint)
        if compare_data:
            differences += training_data_differences(config, checkpoint)
        if differences and config.get("resume_anyway"):
            _warn(f"--resume_anyway: resuming {newest}, which was trained with other settings or data: "
                  + "; ".join(differences))
        elif differences:
            raise CheckpointError(
                f"--ckpt_path last would resume {newest}, which was trained with other settings or data: "
                + "; ".join(differences) + f". To resume it anyway add --resume_anyway (or pass --ckpt_path {newest}); "
                "to start anew, drop --ckpt_path."
            )
        return newest

    def _logger_name(self, config, init_args) -> str:
        name = getattr(init_args, "name", None) or "lightning_logs"
        if name == "auto":
            name = run_name(config.get("config") or [])
        return str(name)

    def before_fit(self) -> None:
        """--resume_anyway reaches the DataModule: training data changed mid-epoch resumes at the next epoch."""
        if self.config[self.subcommand].get("resume_anyway") and hasattr(self.datamodule, "resume_anyway"):
            self.datamodule.resume_anyway = True

    def before_instantiate_classes(self) -> None:
        """A TensorBoard logger named `auto` is named after the config file (see run_name)."""
        if self.program is not None:
            return
        config = self.config[self.subcommand] if self.subcommand else self.config
        logger = config.trainer.get("logger")
        init_args = getattr(logger, "init_args", None)
        if init_args is not None and getattr(init_args, "name", None) == "auto":
            init_args.name = self._logger_name(config, init_args)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_lightning() -> None:
    """Lightning's noise off; our own deprecations on (Python hides DeprecationWarning outside __main__)."""
    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("default", category=DeprecationWarning, message=r".*(is deprecated; write|is now configs/)")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())


def run_cli(argv: list[str]) -> MedDPOCLI:
    """One command line through MedDPOCLI; a Lightning subcommand's config stack is checked first."""
    if argv and argv[0] in MedDPOCLI.subcommands():
        argv = renamed_configs(argv)
        check_config_stack(argv)
    return MedDPOCLI(
        PreferenceModule,
        None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "python -m lightning_meddpo", "description": DESCRIPTION},
        args=argv,
        auto_configure_optimizers=False,
    )


def main(args: list[str] | None = None) -> MedDPOCLI:
    """Run one command line; the CLI it ran is returned (a program's result is its `.result`)."""
    quiet_lightning()
    return guarded(sys.argv[1:] if args is None else list(args), run_cli)


if __name__ == "__main__":
    main(sys.argv[1:])
