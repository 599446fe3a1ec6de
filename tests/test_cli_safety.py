"""No silent wrong runs through the CLI: a checkpoint never turns on remote code nor overrides the user's
config, `--ckpt_path last` resumes only the run this config means, errors are one readable message."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_meddpo.checkpoints import CheckpointError
from lightning_meddpo.cli import TRAINER_DEFAULTS, MedDPOCLI
from lightning_meddpo.modules import DPO
from lightning_meddpo.modules.base import PreferenceModule
from tests.conftest import REPO, small_demo_args

EVIL_CODE = '''
from pathlib import Path
Path(__file__).with_name("REMOTE_CODE_RAN").write_text("yes")
from transformers import PretrainedConfig
class EvilConfig(PretrainedConfig):
    model_type = "evil"
'''


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, demo_dir) -> Path:
    """A real DPO checkpoint of the demo config (tiny://llama, DPO with beta 0.1, lr 3e-3) after one step."""
    from lightning_meddpo.data.datamodule import PreferenceDataModule

    root = tmp_path_factory.mktemp("ckpt")
    module = DPO(beta=0.1, lr=3e-3)
    dm = PreferenceDataModule(str(demo_dir / "train.json"), str(demo_dir / "val.json"), batch_size=4, max_length=128,
                              processor=module.processor)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    path = root / "dpo.ckpt"
    trainer.save_checkpoint(path)
    return path


def crafted(checkpoint: Path, out: Path, **hparams) -> Path:
    state = torch.load(checkpoint, weights_only=True)
    state["hyper_parameters"].update(hparams)
    torch.save(state, out)
    return out


def evil_backbone(root: Path) -> Path:
    backbone = root / "evil_backbone"
    backbone.mkdir()
    (backbone / "evil.py").write_text(EVIL_CODE)
    (backbone / "config.json").write_text('{"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}}')
    return backbone


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_meddpo", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})


class ParseOnly(MedDPOCLI):
    def _run_subcommand(self, subcommand: str) -> None:
        pass  # instantiated, not run


def parsed(*args: str) -> MedDPOCLI:
    """The CLI as a subcommand parses and instantiates it (nothing runs)."""
    return ParseOnly(PreferenceModule, None, subclass_mode_model=True, subclass_mode_data=True,
                     trainer_defaults=TRAINER_DEFAULTS, args=list(args), auto_configure_optimizers=False,
                     save_config_callback=None)


def test_a_checkpoint_cannot_run_remote_code(tmp_path, checkpoint, demo_dir):
    backbone = evil_backbone(tmp_path)
    bad = crafted(checkpoint, tmp_path / "crafted.ckpt", trust_remote_code=True, backbone=str(backbone))
    proc = cli("validate", "--config", "configs/formulations/dpo.yaml", "--config", "configs/backbones/demo.yaml", *small_demo_args(demo_dir, tmp_path), f"--ckpt_path={bad}")
    assert proc.returncode == 2 and "backbone:" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("export", "--ckpt_path", str(bad), "--out", str(tmp_path / "hf"))
    assert proc.returncode != 0
    assert not (backbone / "REMOTE_CODE_RAN").exists()


def test_the_users_config_wins_or_the_run_stops(tmp_path, checkpoint, demo_dir):
    args = ["fit", "--config", str(REPO / "configs/formulations/dpo.yaml"), "--config", str(REPO / "configs/backbones/demo.yaml"), *small_demo_args(demo_dir, tmp_path)]
    cli_run = parsed(*args, "--model.init_args.beta=0.3", f"--ckpt_path={checkpoint}")
    assert cli_run.model.hparams.beta == 0.3 and cli_run.model.hparams.lr == 3e-3  # the checkpoint had beta 0.1
    assert not cli_run.model.hparams.trust_remote_code
    for override, named in (("--model.init_args.backbone=tiny://mistral", "backbone: 'tiny://llama' -> 'tiny://mistral'"),
                            ("--model.init_args.loss_type=ipo", "loss_type: 'sigmoid' -> 'ipo'")):
        with pytest.raises(CheckpointError, match=named.replace("(", r"\(")):
            parsed(*args, override, f"--ckpt_path={checkpoint}")
    with pytest.raises(CheckpointError, match="module class"):
        parsed("fit", "--config", str(REPO / "configs/formulations/sft.yaml"), "--config", str(REPO / "configs/backbones/demo.yaml"), *small_demo_args(demo_dir, tmp_path), f"--ckpt_path={checkpoint}")


def test_ckpt_path_last_resumes_only_this_configs_run(tmp_path, checkpoint, demo_dir):
    runs = tmp_path / "demo" / "dpo"
    args = ["fit", "--config", str(REPO / "configs/formulations/dpo.yaml"), "--config", str(REPO / "configs/backbones/demo.yaml"),
            *small_demo_args(demo_dir, tmp_path), "--data.init_args.batch_size=4", "--ckpt_path=last"]  # as the checkpoint
    older = runs / "version_0" / "checkpoints" / "last.ckpt"
    older.parent.mkdir(parents=True)
    shutil.copy(checkpoint, older)
    assert parsed(*args).config["fit"].ckpt_path == str(older)  # same settings: it is this run, resumed
    newer = runs / "version_1" / "checkpoints" / "last.ckpt"
    newer.parent.mkdir(parents=True)
    crafted(checkpoint, newer, lr=1e-4)  # the newest run was trained at another lr
    with pytest.raises(CheckpointError, match=r"would resume .*version_1.*lr: 0.0001 -> 0.003"):
        parsed(*args)
    with pytest.raises(CheckpointError, match=r"would resume .*version_1.*data.batch_size: 4 -> 8"):
        parsed(*args[:-2], args[-1])  # the demo config's batch size (8), not the checkpoint's (4)
    newer.unlink()
    evaluated = parsed("validate", *args[1:-2], args[-1])  # validate evaluates the newest run on any data
    assert evaluated.config["validate"].ckpt_path == str(older)


def test_errors_are_one_message_and_debug_shows_the_traceback(tmp_path, checkpoint):
    torn = tmp_path / "torn.ckpt"
    torn.write_bytes(checkpoint.read_bytes()[:1000])
    proc = cli("validate", "--config", "configs/formulations/dpo.yaml", "--config", "configs/backbones/demo.yaml", f"--ckpt_path={torn}")
    assert proc.returncode == 2 and "torn.ckpt" in proc.stderr and "truncated" in proc.stderr
    assert "Traceback" not in proc.stderr and "--debug" in proc.stderr
    proc = cli("validate", "--config", "configs/formulations/dpo.yaml", "--config", "configs/backbones/demo.yaml", f"--ckpt_path={torn}", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    proc = cli("fit", "--config", "configs/formulations/dpo.yaml", "--config", "configs/backbones/demo.yaml", f"--model.init_args.backbone={tmp_path / 'no_model'}")
    assert proc.returncode == 2 and "no_model: no such directory" in proc.stderr
    proc = cli("fit", "--config", "configs/formulations/dpo.yaml", "--config", "configs/backbones/demo.yaml", "--model.init_args.beta=0")
    assert proc.returncode == 2 and "beta must be > 0" in proc.stderr


def test_help_lists_every_subcommand():
    proc = cli("--help")
    assert proc.returncode == 0
    for name in ("fit", "validate", "test", "predict", "build-pairs", "convert", "export", "benchmark"):
        assert f"  {name} " in proc.stdout, name
