"""Checkpoints leave the policy's frozen weights out (LoRA's base model, frozen parts) and keep a digest of each;
every load takes them from the model built from the backbone, after checking the digests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from lightning_meddpo.backbones.build import build_policy_model
from lightning_meddpo.backbones.loader import load_model, load_processor
from lightning_meddpo.checkpoints import CheckpointError, values_digest
from lightning_meddpo.commands.export import export
from lightning_meddpo.data.datamodule import PreferenceDataModule
from lightning_meddpo.modules import DPO
from tests.conftest import REPO

LORA = {"r": 4, "alpha": 8}


@pytest.fixture
def backbone(tmp_path) -> Path:
    """The tiny backbone saved as a user's model directory (it is changed by some tests)."""
    out = tmp_path / "backbone"
    load_model("tiny://llama").save_pretrained(out)
    load_processor("tiny://llama").save_pretrained(out)
    return out


def change_a_frozen_weight(backbone: Path) -> str:
    """One value of one MLP weight (frozen under LoRA on q/k/v/o) one float32 step bigger, saved in place."""
    model = load_model(str(backbone))
    name, weight = next((n, p) for n, p in model.named_parameters() if "mlp.down_proj" in n)
    with torch.no_grad():
        weight.view(-1)[0] = torch.nextafter(weight.view(-1)[0], torch.tensor(float("inf")))
    model.save_pretrained(backbone)
    return name


class SaveAt(L.Callback):
    """Saves a checkpoint after optimizer step `step` of the run (as ModelCheckpoint would, mid-run)."""

    def __init__(self, step: int, path: Path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def fit(backbone: Path, demo_dir: Path, root: Path, steps: int, ckpt_path: Path | None = None,
        save_at: SaveAt | None = None, **module_args):
    torch.manual_seed(0)
    module = DPO(backbone=str(backbone), lr=1e-2, beta=0.5, **module_args)
    data = PreferenceDataModule(str(demo_dir / "train.json"), str(demo_dir / "val.json"), batch_size=4, max_length=128,
                                processor=module.processor, shuffle=False)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, limit_val_batches=0, num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                        enable_checkpointing=False, callbacks=[save_at] if save_at else [])
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer


def trainable(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.policy.model.named_parameters() if p.requires_grad}


def test_values_digest_follows_the_values_not_the_dtype(monkeypatch):
    import lightning_meddpo.checkpoints as checkpoints

    monkeypatch.setattr(checkpoints, "_DIGEST_CHUNK", 7)  # several chunks
    w = torch.randn(5, 9).bfloat16().float()
    digest = values_digest(w)
    assert values_digest(w.bfloat16()) == digest == values_digest(w.clone().reshape(9, 5))
    nudged = w.clone()
    nudged[4, 8] = torch.nextafter(nudged[4, 8], torch.tensor(float("inf")))
    swapped = w.clone().view(-1)
    swapped[[2, 20]] = swapped[[20, 2]]  # two values trade places, across chunks
    assert len({digest, values_digest(nudged), values_digest(swapped), values_digest(-w)}) == 4
    assert 0 <= digest < 2**64


def test_a_lora_checkpoint_keeps_the_adapters_and_resumes_as_if_never_stopped(backbone, demo_dir, tmp_path):
    slim, full = tmp_path / "slim.ckpt", tmp_path / "full.ckpt"
    straight, _ = fit(backbone, demo_dir, tmp_path / "straight", 4, save_at=SaveAt(2, slim), lora=LORA)
    fit(backbone, demo_dir, tmp_path / "full", 4, save_at=SaveAt(2, full), lora=LORA, save_frozen_weights=True)

    state = torch.load(slim, map_location="cpu", weights_only=True)
    frozen = {f"policy.model.{n}" for n, p in straight.policy.model.named_parameters() if not p.requires_grad}
    adapters = {f"policy.model.{n}" for n in trainable(straight)}
    assert set(state["meddpo"]["left_out"]) == frozen and not frozen & set(state["state_dict"])
    assert adapters <= set(state["state_dict"])
    assert frozen <= set(torch.load(full, map_location="cpu", weights_only=True)["state_dict"])
    assert slim.stat().st_size < full.stat().st_size / 2

    resumed, _ = fit(backbone, demo_dir, tmp_path / "resumed", 4, ckpt_path=slim, lora=LORA)
    after, want = trainable(resumed), trainable(straight)
    assert after.keys() == want.keys() and all(torch.equal(after[n], want[n]) for n in want)

    exported = [load_file(export(str(c), str(tmp_path / f"hf-{c.stem}")) / "model.safetensors") for c in (slim, full)]
    assert exported[0].keys() == exported[1].keys()
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])


def test_a_checkpoint_without_its_frozen_weights_refuses_a_changed_backbone(backbone, demo_dir, tmp_path):
    module, trainer = fit(backbone, demo_dir, tmp_path / "run", 2, lora=LORA)
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)
    assert DPO.load_from_checkpoint(ckpt).policy is not None  # the same backbone: it loads

    changed = change_a_frozen_weight(backbone)
    for load in (lambda: DPO.load_from_checkpoint(ckpt), lambda: fit(backbone, demo_dir, tmp_path / "again", 4, ckpt, lora=LORA),
                 lambda: export(str(ckpt), str(tmp_path / "hf"))):
        with pytest.raises(CheckpointError, match="differ from the backbone's now") as e:
            load()
        assert changed in str(e.value) and "the backbone (or init_from) is not the one the run was trained from" in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_init_from_a_checkpoint_without_its_frozen_weights(backbone, demo_dir, tmp_path):
    """Full fine-tuning leaves out the CLIP layers after the feature layer (never trained); a later run starting
    from the checkpoint gets them from its backbone, checked."""
    module, trainer = fit(backbone, demo_dir, tmp_path / "run", 2)
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["meddpo"]["left_out"]
    started = dict(build_policy_model(str(backbone), init_from=str(ckpt)).named_parameters())
    trained = dict(module.policy.model.named_parameters())
    assert started.keys() == trained.keys() and all(torch.equal(started[n], trained[n]) for n in trained)

    change_a_frozen_weight(backbone)  # a weight the run trained: the checkpoint's value wins, nothing to check
    build_policy_model(str(backbone), init_from=str(ckpt))
    model = load_model(str(backbone))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "vision_tower" in n and ".layers.1." in n).add_(1.0)
    model.save_pretrained(backbone)  # one of the left-out CLIP layers changed: refused
    with pytest.raises(CheckpointError, match="differ from the backbone's now"):
        build_policy_model(str(backbone), init_from=str(ckpt))


def test_resume_with_a_changed_backbone_is_one_line_naming_the_checkpoint(backbone, demo_dir, tmp_path):
    """Through the CLI: the resume of a LoRA run whose backbone changed since stops before a step, in one line."""
    def run(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "lightning_meddpo", "fit", "--config", str(REPO / "configs/formulations/dpo.yaml"),
               "--config", str(REPO / "configs/backbones/demo.yaml"), f"--model.init_args.backbone={backbone}",
               f"--model.init_args.lora={json.dumps(LORA)}", "--data.init_args.demo=false",
               f"--data.init_args.train_file={demo_dir / 'train.json'}", f"--data.init_args.val_file={demo_dir / 'val.json'}",
               "--data.init_args.batch_size=4", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
               "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", *args]
        return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONPATH": str(REPO)})

    first = run("--trainer.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    (last,) = (tmp_path / "runs").rglob("last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=True)["meddpo"]["left_out"]
    change_a_frozen_weight(backbone)
    proc = run("--trainer.max_steps=4", "--ckpt_path=last")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert str(last) in line and "differ from the backbone's now" in line


def test_the_benchmark_measures_a_smaller_lora_checkpoint():
    """benchmarks/checkpoint_size.py runs (a small shape): the default LoRA checkpoint is the smaller one."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from checkpoint_size import main

    (row,) = main(["--hidden", "64", "--layers", "2"])
    assert 0 < row["default"]["mib"] < row["save_frozen_weights"]["mib"] / 2 and row["frozen_parameters"] > 0
