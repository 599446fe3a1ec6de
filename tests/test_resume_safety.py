"""A resume never continues the wrong run (through the CLI, as subprocesses): `--ckpt_path last` checks the data
the run trained on, a changed callback list still leaves one last.ckpt with the newest state, and a number that
is finite in JSON but not in float32 is refused at setup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_meddpo.data.fingerprint import data_differences, data_files
from lightning_meddpo.demo.synthetic import generate_demo_dataset
from tests.conftest import REPO


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    paths = generate_demo_dataset(tmp_path_factory.mktemp("resume_data"), n_train=16, n_val=4, n_test=4)
    records = json.loads(paths["train"].read_text())
    for r in records:  # the same pairs, answers swapped: what "pointing at another file" did in the report
        r["conversations"][-1], r["rejected_conversations"][-1] = r["rejected_conversations"][-1], r["conversations"][-1]
    paths["reversed"] = paths["root"] / "reversed.json"
    paths["reversed"].write_text(json.dumps(records))
    return paths


def fit(root: Path, *args: str, method: str = "dpo") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lightning_meddpo", "fit", "--config", str(REPO / f"configs/methods/{method}.yaml"),
           "--config", str(REPO / "configs/backbones/demo.yaml"), "--data.init_args.demo=false",
           "--data.init_args.batch_size=4", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
           "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={root / 'runs'}", *args]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    return next(line for line in proc.stderr.splitlines() if "error:" in line)


def test_ckpt_path_last_resumes_only_a_run_of_the_same_data(tmp_path, data):
    train = tmp_path / "train.json"  # the user's file, edited between the runs below
    train.write_text(data["train"].read_text())
    files = [f"--data.init_args.image_root={data['root']}", f"--data.init_args.val_file={data['val']}"]
    ok(fit(tmp_path, *files, f"--data.init_args.train_file={train}", "--trainer.max_steps=2"))
    last = tmp_path / "runs/demo/dpo/version_0/checkpoints/last.ckpt"
    assert step_of(last) == 2

    # pointed at another file: refused, naming the file and the ways out
    line = one_line_error(fit(tmp_path, *files, f"--data.init_args.train_file={data['reversed']}", "--trainer.max_steps=4",
                              "--ckpt_path=last"))
    assert f"train_file: {train}" in line and str(data["reversed"]) in line
    assert "--resume_anyway" in line and "drop --ckpt_path" in line

    # the same path with other bytes: refused, saying the content changed
    train.write_text(data["reversed"].read_text())
    line = one_line_error(fit(tmp_path, *files, f"--data.init_args.train_file={train}", "--trainer.max_steps=4",
                              "--ckpt_path=last"))
    assert "the file's content changed" in line

    # a changed training setting is a difference too
    train.write_text(data["train"].read_text())
    line = one_line_error(fit(tmp_path, *files, f"--data.init_args.train_file={train}", "--trainer.max_steps=4",
                              "--data.init_args.max_length=96", "--ckpt_path=last"))
    assert "data.max_length: 128 -> 96" in line

    # forced: resumed at its step, with the differences said in one warning line
    proc = ok(fit(tmp_path, *files, f"--data.init_args.train_file={data['reversed']}", "--trainer.max_steps=4",
                  "--ckpt_path=last", "--resume_anyway"))
    assert "warning: --resume_anyway: resuming" in proc.stderr and "train_file:" in proc.stderr
    newest = max(tmp_path.glob("runs/demo/dpo/version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    assert step_of(newest) == 4

    # an explicit path with other data runs, and says so in one line
    proc = ok(fit(tmp_path, *files, f"--data.init_args.train_file={train}", "--trainer.max_steps=5", f"--ckpt_path={newest}"))
    warning = [line for line in proc.stderr.splitlines() if "which was trained on other data" in line]
    assert len(warning) == 1 and f"train_file: {data['reversed']}" in warning[0]


def test_data_differences_compare_bytes_and_training_settings(tmp_path):
    a = tmp_path / "a.json"
    a.write_text("[1]")
    settings = {"train_file": str(a), "val_file": None, "max_length": 128, "num_workers": 0}
    saved = data_files(settings)
    assert data_differences(settings, saved, settings) == []
    assert data_differences(settings, saved, {**settings, "num_workers": 4}) == []  # not a training setting
    a.write_text("[2]")
    (difference,) = data_differences(settings, saved, settings)
    assert difference.startswith("train_file:") and difference.endswith("(the file's content changed)")
    a.unlink()
    assert "(missing)" in data_differences(settings, saved, settings)[0]
    assert data_differences(settings, None, {**settings, "max_length": 64}) == ["data.max_length: 128 -> 64"]  # older checkpoint


def test_a_changed_callback_list_still_leaves_one_last_ckpt(tmp_path, data):
    """The killed run had a monitored checkpoint and a learning-rate monitor; the resume lists one callback fewer
    and no monitor: Lightning would not restore the checkpoint callback's state and would write last-v1.ckpt,
    leaving last.ckpt stale for the next `--ckpt_path last`."""
    ckpt = tmp_path / "ckpt"

    def config(name: str, callbacks: list[dict]) -> str:
        path = tmp_path / name
        path.write_text(json.dumps({"trainer": {"callbacks": callbacks, "logger": False}}))
        return str(path)

    saver = {"class_path": "lightning_meddpo.callbacks.ResumableCheckpoint",
             "init_args": {"dirpath": str(ckpt), "save_last": True, "save_top_k": 0, "last_every_n_steps": 1}}
    killed = config("killed.yaml", [{**saver, "init_args": {**saver["init_args"], "monitor": "val/rewards/accuracies"}},
                                    {"class_path": "lightning_meddpo.callbacks.Throughput"}])
    files = [f"--data.init_args.train_file={data['train']}", f"--data.init_args.val_file={data['val']}"]
    ok(fit(tmp_path, "--config", killed, *files, "--trainer.max_steps=2"))
    assert step_of(ckpt / "last.ckpt") == 2
    ok(fit(tmp_path, "--config", config("resumed.yaml", [saver]), *files, "--trainer.max_steps=5",
           f"--ckpt_path={ckpt / 'last.ckpt'}"))
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.ckpt"]
    assert step_of(ckpt / "last.ckpt") == 5


def test_a_score_that_overflows_float32_is_refused_at_setup(tmp_path, data):
    records = json.loads(data["train"].read_text())
    for r in records:
        r["weighted_score"] = 0.5
    records[3]["weighted_score"] = 1e39  # finite in JSON (a Python float), inf in float32
    train = data["root"] / "overflow.json"
    train.write_text(json.dumps(records))
    files = [f"--data.init_args.train_file={train}", f"--data.init_args.val_file={train}", "--trainer.max_steps=1"]
    line = one_line_error(fit(tmp_path, *files, method="mmedpo"))
    assert records[3]["id"] in line and "weighted_score" in line and "float32" in line
    proc = ok(fit(tmp_path, *files, "--data.init_args.skip_invalid=true", method="mmedpo"))
    assert "1 skipped: field weighted_score: inf in float32" in proc.stdout, proc.stdout[-2000:]
    assert "train: 15 pairs" in proc.stdout
