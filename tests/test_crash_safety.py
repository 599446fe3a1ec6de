"""Crash safety: a run killed with SIGKILL and resumed with `--ckpt_path` ends with bit-identical weights
to the run that was never interrupted; a resume continues the epoch's data order exactly; checkpoint writes
are atomic; unreadable checkpoints are clear errors; a NaN never trains."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_meddpo.callbacks import ResumableCheckpoint
from lightning_meddpo.checkpoints import CheckpointError, read_checkpoint_meta
from lightning_meddpo.data.datamodule import PreferenceDataModule
from lightning_meddpo.demo.synthetic import generate_demo_dataset
from lightning_meddpo.modules import DPO
from tests.conftest import REPO

MAX_STEPS = 10  # 16 pairs, batch 4: 4 steps an epoch, so the runs cross two epoch boundaries


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate_demo_dataset(tmp_path_factory.mktemp("crash_data"), n_train=16, n_val=4, n_test=4)


def write_config(root: Path, data: dict, formulation: str) -> Path:
    """A run config: the demo formulation, the small data, last.ckpt after every step, no validation."""
    config = {
        "trainer": {"max_steps": MAX_STEPS, "limit_val_batches": 0, "num_sanity_val_steps": 0, "logger": False,
                    "enable_progress_bar": False, "default_root_dir": str(root),
                    "callbacks": [{"class_path": "lightning_meddpo.callbacks.ResumableCheckpoint",
                                   "init_args": {"dirpath": str(root / "ckpt"), "save_last": True, "save_top_k": 0,
                                                 "last_every_n_steps": 1}}]},
        "data": {"init_args": {"train_file": str(data["train"]), "val_file": str(data["val"]), "test_file": str(data["test"]),
                               "demo": False, "batch_size": 4, "max_length": 128}},
    }
    if formulation == "mdpo":  # m' made on the fly, anew each epoch (the records' own m' dropped)
        records = json.loads(data["train"].read_text())
        for r in records:
            r.pop("rejected_image")
        train = root / "train.json"
        train.write_text(json.dumps(records))
        shutil.copytree(data["images"], root / "images")
        config["data"]["init_args"].update(train_file=str(train), val_file=str(train), corruption="crop")
    path = root / "run.yaml"
    path.write_text(json.dumps(config))
    return path


def fit(root: Path, run_config: Path, formulation: str, *extra: str, background: bool = False):
    cmd = [sys.executable, "-m", "lightning_meddpo", "fit", "--config", str(REPO / f"configs/formulations/{formulation}.yaml"),
           "--config", str(REPO / "configs/backbones/demo.yaml"),
           "--config", str(run_config), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if background:
        return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def final_weights(root: Path) -> dict[str, torch.Tensor]:
    state = torch.load(root / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == MAX_STEPS
    return state["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("formulation", ["dpo", "mdpo", "kto"])
def test_kill_9_and_resume_gives_bit_identical_weights(tmp_path, data, formulation):
    straight = tmp_path / "straight"
    straight.mkdir()
    fit(straight, write_config(straight, data, formulation), formulation)

    killed = tmp_path / "killed"
    killed.mkdir()
    config = write_config(killed, data, formulation)
    proc = fit(killed, config, formulation, background=True)
    last = killed / "ckpt" / "last.ckpt"
    deadline = time.monotonic() + 300
    step = 0
    while step < 5 and time.monotonic() < deadline and proc.poll() is None:  # mid-way through the second epoch
        time.sleep(0.01)
        if last.exists():
            try:
                step = read_checkpoint_meta(last)["global_step"]
            except CheckpointError:
                pass  # never: writes are atomic (asserted below by resuming from whatever is there)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < step < MAX_STEPS, f"killed at step {step} ({proc.stderr.read()[-2000:] if proc.stderr else ''})"

    fit(killed, config, formulation, f"--ckpt_path={last}")
    a, b = final_weights(straight), final_weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


class Order(L.Callback):
    def __init__(self):
        self.seen: list[tuple[int, int, tuple[str, ...]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step, trainer.current_epoch, tuple(batch.ids)))


class StopAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def run(tmp_path: Path, data: dict, name: str, stop: int | None = None, ckpt: Path | None = None,
        max_steps: int = MAX_STEPS, every: int | None = 1, num_workers: int = 0):
    torch.manual_seed(0)
    module = DPO(beta=0.5, lr=1e-3)
    dm = PreferenceDataModule(str(data["train"]), str(data["val"]), batch_size=4, max_length=128, processor=module.processor,
                              num_workers=num_workers)
    order = Order()
    callbacks = [order, ResumableCheckpoint(dirpath=str(tmp_path / name), save_last=True, save_top_k=0, last_every_n_steps=every)]
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=callbacks + ([StopAt(stop)] if stop else []), enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    return module, order.seen


@pytest.mark.parametrize("num_workers", [0, 1], ids=["in-process", "workers"])
@pytest.mark.parametrize("stop", [6, 4], ids=["mid-epoch", "epoch-boundary"])
def test_resume_draws_the_order_the_uninterrupted_run_draws(tmp_path, data, stop, num_workers, recwarn):
    """No restart of the epoch's shuffle mid-epoch, no epoch skipped at a boundary: the resumed run sees
    the same batches at the same steps and ends with the same weights; with data workers too (they start only
    once Lightning has set the epoch)."""
    full, seen_full = run(tmp_path, data, "full", num_workers=num_workers)
    run(tmp_path, data, "part", stop=stop, num_workers=num_workers)
    resumed, seen_resumed = run(tmp_path, data, "part", ckpt=tmp_path / "part" / "last.ckpt", num_workers=num_workers)
    assert seen_resumed == seen_full[stop:]
    for a, b in zip(full.policy.model.state_dict().values(), resumed.policy.model.state_dict().values()):
        assert torch.equal(a, b)
    assert not [w for w in recwarn if "not resumable" in str(w.message)]


@pytest.mark.parametrize("stop", [4, 6], ids=["epoch-end", "mid-epoch"])
def test_a_run_ended_by_max_steps_is_continued_where_it_stopped(tmp_path, data, stop):
    """last.ckpt written only when the run ends (no periodic saves), then resumed with a larger max_steps: the same
    batches as the uninterrupted run. Written in Lightning's epoch-end hooks, the resume would train one batch of
    the next epoch and then jump to the one after."""
    _, seen_full = run(tmp_path, data, "full")
    run(tmp_path, data, "part", max_steps=stop, every=None)  # (its lr schedule spans `stop` steps: other weights)
    _, seen_resumed = run(tmp_path, data, "part", ckpt=tmp_path / "part" / "last.ckpt", every=None)
    assert seen_resumed == seen_full[stop:]


def test_a_save_is_atomic_and_a_torn_checkpoint_is_a_clear_error(tmp_path, data):
    module, _ = run(tmp_path, data, "ckpt", stop=2)
    last = tmp_path / "ckpt" / "last.ckpt"
    good = last.read_bytes()
    assert not list((tmp_path / "ckpt").glob(".*partial"))  # nothing left half-written
    torn = tmp_path / "torn.ckpt"
    torn.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="torn.ckpt.*truncated"):
        read_checkpoint_meta(torn)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_checkpoint_meta(tmp_path / "empty.ckpt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        read_checkpoint_meta(tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint_meta(tmp_path / "nope.ckpt")


class PoisonOnce(L.Callback):
    """Turns one step's loss into NaN by corrupting a weight before the step, then mends it."""

    def __init__(self, step: int):
        self.step, self.saved = step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            weight = pl_module.policy.model.lm_head.weight
            self.saved = weight.detach().clone()
            with torch.no_grad():
                weight[0, 0] = float("nan")

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.saved is not None:
            with torch.no_grad():
                pl_module.policy.model.lm_head.weight.copy_(self.saved)
            self.saved = None


class Snapshots(L.Callback):
    """The policy's LM head at the start of every step."""

    def __init__(self):
        self.weights: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights.append(pl_module.policy.model.lm_head.weight.detach()[1:].clone())


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_nan_never_trains(tmp_path, data, mode):
    module = DPO(beta=0.5, lr=1e-3, nonfinite=mode)
    dm = PreferenceDataModule(str(data["train"]), str(data["val"]), batch_size=4, max_length=128, processor=module.processor)
    snapshots = Snapshots()
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, limit_val_batches=0, num_sanity_val_steps=0,
                        enable_checkpointing=False, callbacks=[PoisonOnce(2), snapshots], enable_progress_bar=False,
                        enable_model_summary=False)
    if mode == "stop":
        with pytest.raises(FloatingPointError, match=r"loss is nan at step 2 on records \['synth-train-.*loss/dpo=nan"):
            trainer.fit(module, datamodule=dm)
        return
    trainer.fit(module, datamodule=dm)
    w = snapshots.weights
    assert module._nonfinite_skipped == 1 and len(w) == 4
    assert not torch.equal(w[1], w[2]) and torch.equal(w[2], w[3])  # the poisoned step changed nothing
    assert all(torch.isfinite(p).all() for p in module.policy.model.parameters())


def test_a_nonfinite_gradient_stops_or_is_dropped():
    module = DPO(beta=0.5)
    module.configure_model()
    module._batch_ids = ["r1", "r2"]
    params = [p for p in module.policy.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    params[0].grad[0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"gradient norm is inf at step .* records \['r1', 'r2'\]"):
        module.on_before_optimizer_step(None)
    module.hparams.nonfinite = "skip"
    module.on_before_optimizer_step(None)
    assert all(p.grad is None for p in params) and module._nonfinite_skipped == 1  # no update from it


def test_a_gradient_that_stays_zero_is_warned_about():
    module = DPO(beta=0.5)
    module.configure_model()
    for p in module.policy.model.parameters():
        p.grad = None  # e.g. every part frozen: no gradient at all
    with pytest.warns(UserWarning, match="exactly 0 for 20 steps.*nothing is training"):
        for _ in range(20):
            module.on_before_optimizer_step(None)


@pytest.mark.slow
def test_a_preempted_job_saves_requeues_and_resumes_bit_identically(tmp_path, data):
    """SIGUSR1 (Slurm's warning before the time limit) to a fit under Slurm: the step in flight finishes, last.ckpt
    is written, `scontrol requeue <job>` is called, the process exits 0; `--ckpt_path last.ckpt` then ends with the
    weights of the run that was never interrupted. No periodic saves: the signal alone makes the checkpoint."""
    def preemptible(root: Path) -> Path:
        config = json.loads(write_config(root, data, "dpo").read_text())
        saver = config["trainer"]["callbacks"][0]["init_args"]
        saver.pop("last_every_n_steps")
        config["trainer"]["callbacks"] += [{"class_path": "lightning_meddpo.callbacks.Preemption"},
                                           {"class_path": "tests.batch_log.BatchLog", "init_args": {"path": str(root / "batches.jsonl")}}]
        path = root / "run.yaml"
        path.write_text(json.dumps(config))
        return path

    straight = tmp_path / "straight"
    straight.mkdir()
    fit(straight, preemptible(straight), "dpo")

    job = tmp_path / "job"
    job.mkdir()
    bin_dir = tmp_path / "bin"  # a fake scontrol that records how it was called
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    config = preemptible(job)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    cmd = [sys.executable, "-m", "lightning_meddpo", "fit", "--config", str(REPO / "configs/formulations/dpo.yaml"),
           "--config", str(REPO / "configs/backbones/demo.yaml"), "--config", str(config)]
    proc = subprocess.Popen(cmd, cwd=job, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    batches = job / "batches.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and \
            (not batches.exists() or len(batches.read_text().splitlines()) < 6):  # into step 6, mid-epoch 1
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGUSR1 received: stopping after step" in err
    last = job / "ckpt" / "last.ckpt"
    stopped_at = read_checkpoint_meta(last)["global_step"]
    assert 5 <= stopped_at < MAX_STEPS and (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]

    fit(job, config, "dpo", f"--ckpt_path={last}")  # the requeued job
    a, b = final_weights(straight), final_weights(job)
    for key in a:
        assert torch.equal(a[key], b[key]), key
