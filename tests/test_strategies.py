"""Scale: FSDP2 (ModelParallelStrategy) and DDP on CPU with 2 processes (gloo), as CLI subprocesses;
checkpoints saved and resumed; a sharded FSDP2 checkpoint exported to a Hugging Face directory.
The structure of the FSDP2 sharding is checked in-process on a 1-rank gloo group.

The CLI runs are few and tiny (32 training pairs, 2 + 2 steps): each takes ~20-40 s on a laptop CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

from tests.conftest import run_program

ROOT = Path(__file__).resolve().parents[1]
DEMO_SIZE = "{n_train: 32, n_val: 16, n_test: 16}"


def cli(tmp_path: Path, *args: str, timeout: int = 300) -> str:
    data = tmp_path / "data"
    cmd = [
        sys.executable, "-m", "lightning_meddpo", "fit", "--config", str(ROOT / "configs/formulations/dpo.yaml"), "--config", str(ROOT / "configs/backbones/demo.yaml"), *args,
        "--data.init_args.demo", DEMO_SIZE,
        "--data.init_args.train_file", str(data / "train.json"),
        "--data.init_args.val_file", str(data / "val.json"),
        "--data.init_args.test_file", str(data / "test.json"),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar=false",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def last_checkpoint(tmp_path: Path, version: int) -> Path:
    """runs/<name>/version_N/checkpoints/last.ckpt, whatever the logger's name (demo, demo/dpo, ...)."""
    found = sorted((tmp_path / "runs").glob(f"**/version_{version}/checkpoints/last.ckpt"))
    assert len(found) == 1, found
    return found[0]


@pytest.mark.slow
def test_fsdp2_two_processes_save_resume_export(tmp_path):
    strategy = ["--config", str(ROOT / "configs/strategies/fsdp2.yaml"), "--trainer.devices=2"]
    out = cli(tmp_path, *strategy, "--trainer.max_steps=2")
    assert "Starting with 2 processes" in out and "`max_steps=2` reached" in out
    ckpt = last_checkpoint(tmp_path, 0)
    assert ckpt.is_dir() and {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"} <= {p.name for p in ckpt.iterdir()}

    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    assert any(k.startswith("state_dict.policy.model.") for k in keys)
    assert not any(k.startswith("state_dict.policy.reference.") for k in keys)  # rebuilt on load

    out = cli(tmp_path, *strategy, "--trainer.max_steps=4", "--ckpt_path", str(ckpt))
    assert "Restored all states from the checkpoint" in out and "`max_steps=4` reached" in out

    # export the sharded checkpoint, reading the module from the run's config.yaml
    from lightning_meddpo.commands.export import read_checkpoint

    resumed = last_checkpoint(tmp_path, 1)
    hf = tmp_path / "hf"
    run_program("export", ["--ckpt_path", str(resumed), "--config", str(resumed.parents[1] / "config.yaml"), "--out", str(hf)])
    full = read_checkpoint(resumed)
    assert full["global_step"] == 4  # 2 steps per epoch (16 pairs per rank, batch 8): trained on after the resume
    model = AutoModelForImageTextToText.from_pretrained(hf)
    exported = model.state_dict()
    for key, value in full["state_dict"].items():
        assert torch.equal(exported[key.removeprefix("policy.model.")], value), key
    # without --config the module class and arguments come from the checkpoint
    run_program("export", ["--ckpt_path", str(resumed), "--out", str(tmp_path / "hf2")])
    assert (tmp_path / "hf2" / "model.safetensors").read_bytes() == (hf / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_ddp_two_processes_save_resume(tmp_path):
    strategy = ["--config", str(ROOT / "configs/strategies/ddp.yaml"), "--trainer.devices=2"]
    out = cli(tmp_path, *strategy, "--trainer.max_steps=2")
    assert "Starting with 2 processes" in out
    ckpt = last_checkpoint(tmp_path, 0)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
    assert not any(k.startswith("policy.reference.") for k in state["state_dict"])
    out = cli(tmp_path, *strategy, "--trainer.max_steps=4", "--ckpt_path", str(ckpt))
    assert "Restored all states from the checkpoint" in out and "`max_steps=4` reached" in out


def test_fsdp_configs_parse(tmp_path):
    """fsdp.yaml (FSDPStrategy, GPU only) layered after a run config: the layer classes resolve."""
    cmd = [sys.executable, "-m", "lightning_meddpo", "fit", "--config", str(ROOT / "configs/formulations/dpo.yaml"), "--config", str(ROOT / "configs/backbones/demo.yaml"),
           "--config", str(ROOT / "configs/strategies/fsdp.yaml"), "--print_config"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import yaml

    trainer = yaml.safe_load(proc.stdout)["trainer"]
    assert trainer["precision"] == "bf16-mixed"
    args = trainer["strategy"]["init_args"]
    assert args["sharding_strategy"] == "FULL_SHARD" and args["state_dict_type"] == "sharded"
    assert "transformers.models.mistral.modeling_mistral.MistralDecoderLayer" in args["auto_wrap_policy"]
    assert trainer["logger"]["class_path"].endswith("TensorBoardLogger")  # the run config's keys survive


def test_fully_shard_layers_and_reference(tmp_path, monkeypatch):
    """configure_model under a device mesh: each decoder / vision layer and the root are FSDP2 units,
    the `copy` reference too, and sharded training gives the same loss as unsharded."""
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from lightning_meddpo.modules import DPO

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
        module = DPO()
        module._device_mesh = mesh
        module.configure_model()
        for model in (module.policy.model, module.policy.reference):
            units = [type(m).__name__.removeprefix("FSDP") for m in model.modules() if isinstance(m, FSDPModule)]
            assert units.count("LlamaDecoderLayer") == 2 and units.count("CLIPEncoderLayer") == 2
            assert isinstance(model, FSDPModule)
            assert all(isinstance(p, DTensor) for p in model.parameters())

        from lightning_meddpo.data.datamodule import PreferenceDataModule
        from lightning_meddpo.demo.synthetic import generate_demo_dataset

        data = generate_demo_dataset(tmp_path / "data", n_train=8, n_val=4, n_test=4)
        dm = PreferenceDataModule(str(data["train"]), str(data["val"]), batch_size=4, max_length=128,
                                  processor=module.processor)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        plain = DPO()
        plain.configure_model()
        sharded_loss, _ = module.compute_loss(batch)
        plain_loss, _ = plain.compute_loss(batch)
        assert torch.allclose(sharded_loss, plain_loss, atol=1e-6)
        # after the forward every layer holds its shard again: no rank keeps the gathered model until the backward
        for model in (module.policy.model, module.policy.reference):
            gathered = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
            assert not gathered, f"still gathered after the forward: {gathered[:4]}"

        checkpointed = DPO(gradient_checkpointing=True)  # activation checkpointing per layer, under FSDP2 too
        checkpointed._device_mesh = mesh
        checkpointed.configure_model()
        loss, _ = checkpointed.compute_loss(batch)
        assert torch.allclose(loss, plain_loss, atol=1e-6)
        loss.backward()
        plain_loss.backward()
        for (name, p), q in zip(checkpointed.policy.model.named_parameters(), plain.policy.model.parameters()):
            if q.grad is not None:
                torch.testing.assert_close(p.grad.full_tensor(), q.grad, atol=1e-6, rtol=1e-5, msg=name)

        # bf16-mixed: the reference's linear layers stored in bfloat16 beside its float32 norms, in the same units
        mixed = DPO()
        mixed._device_mesh = mesh
        mixed._trainer = types.SimpleNamespace(precision="bf16-mixed", strategy=None)
        mixed.configure_model()
        dtypes = {p.dtype for p in mixed.policy.reference.parameters()}
        assert dtypes == {torch.float32, torch.bfloat16}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = mixed.compute_loss(batch)
            expected, _ = plain.compute_loss(batch)
        assert torch.equal(loss, expected)
        loss.backward()
    finally:
        dist.destroy_process_group()
