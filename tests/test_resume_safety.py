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


def fit(root: Path, *args: str, method: str = "dpo", program: str = "fit") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lightning_meddpo", program, "--config", str(REPO / f"configs/formulations/{method}.yaml"),
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
    ok(fit(tmp_path, *files, f"--data.init_args.train_file={train}", "--trainer.max_steps=4"))  # one epoch
    first = tmp_path / "runs/demo/dpo/version_0/checkpoints/last.ckpt"
    assert step_of(first) == 4

    # pointed at another file: refused, naming the file and the ways out
    line = one_line_error(fit(tmp_path, *files, f"--data.init_args.train_file={data['reversed']}", "--trainer.max_steps=6",
                              "--ckpt_path=last"))
    assert f"train_file: {train}" in line and str(data["reversed"]) in line
    assert "--resume_anyway" in line and "drop --ckpt_path" in line

    # the same path with other bytes: refused, saying the content changed
    train.write_text(data["reversed"].read_text())
    line = one_line_error(fit(tmp_path, *files, f"--data.init_args.train_file={train}", "--trainer.max_steps=6",
                              "--ckpt_path=last"))
    assert "the file's content changed" in line

    # a changed training setting is a difference too
    train.write_text(data["train"].read_text())
    line = one_line_error(fit(tmp_path, *files, f"--data.init_args.train_file={train}", "--trainer.max_steps=6",
                              "--data.init_args.max_length=96", "--ckpt_path=last"))
    assert "data.max_length: 128 -> 96" in line

    # forced: resumed at its step, with the differences said in one warning line
    proc = ok(fit(tmp_path, *files, f"--data.init_args.train_file={data['reversed']}", "--trainer.max_steps=6",
                  "--ckpt_path=last", "--resume_anyway"))
    assert "warning: --resume_anyway: resuming" in proc.stderr and "train_file:" in proc.stderr
    forced = tmp_path / "runs/demo/dpo/version_1/checkpoints/last.ckpt"
    assert step_of(forced) == 6  # 2 batches into epoch 1

    # an explicit path with other data, at an epoch boundary: it runs, and says so in one line
    proc = ok(fit(tmp_path, *files, f"--data.init_args.train_file={data['reversed']}", "--trainer.max_steps=5",
                  f"--ckpt_path={first}"))
    warning = [line for line in proc.stderr.splitlines() if "which was trained on other data" in line]
    assert len(warning) == 1 and f"train_file: {train}" in warning[0]

    # ... and mid-epoch: which pairs the epoch still owes is unknown on other data, so it is refused
    line = one_line_error(fit(tmp_path, *files, f"--data.init_args.train_file={train}", "--trainer.max_steps=8",
                              f"--ckpt_path={forced}"))
    assert "cannot resume mid-epoch 1 (2 batches trained on)" in line and "--resume_anyway" in line


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


def logged(path: Path) -> str:
    return f'--trainer.callbacks+={{"class_path": "tests.batch_log.BatchLog", "init_args": {{"path": "{path}"}}}}'


def batches(path: Path) -> list[tuple[int, int, list[str]]]:
    return [tuple(json.loads(line)) for line in path.read_text().splitlines()]


def test_a_mid_epoch_resume_with_another_batch_size_trains_every_remaining_pair_once(tmp_path, data):
    """16 pairs in batches of 4, stopped after 2 steps (8 pairs of epoch 0 trained), resumed in batches of 2: the rest
    of epoch 0 is exactly the 8 other pairs, each once; epoch 1 is the uninterrupted run's epoch 1."""
    files = [f"--data.init_args.train_file={data['train']}", f"--data.init_args.val_file={data['val']}"]
    ok(fit(tmp_path, *files, "--trainer.max_steps=2", logged(tmp_path / "first.jsonl")))
    last = tmp_path / "runs/demo/dpo/version_0/checkpoints/last.ckpt"
    ok(fit(tmp_path, *files, "--trainer.max_steps=8", f"--ckpt_path={last}", "--data.init_args.batch_size=2",
           logged(tmp_path / "resumed.jsonl")))
    first, resumed = batches(tmp_path / "first.jsonl"), batches(tmp_path / "resumed.jsonl")
    trained = [i for _, epoch, ids in first + resumed if epoch == 0 for i in ids]
    assert sorted(trained) == sorted(r["id"] for r in json.loads(data["train"].read_text()))  # each pair once
    assert [len(ids) for _, epoch, ids in resumed if epoch == 0] == [2, 2, 2, 2]
    assert [step for step, _, _ in resumed] == list(range(2, 8)) and resumed[-1][1] == 1


def test_a_mid_epoch_resume_on_other_data_is_refused(tmp_path, data):
    grown = data["root"] / "grown.json"
    records = json.loads(data["train"].read_text())
    grown.write_text(json.dumps(records + [{**r, "id": r["id"] + "-copy"} for r in records[:8]]))  # 16 -> 24 pairs
    files = [f"--data.init_args.val_file={data['val']}"]
    ok(fit(tmp_path, *files, f"--data.init_args.train_file={data['train']}", "--trainer.max_steps=2"))
    last = tmp_path / "runs/demo/dpo/version_0/checkpoints/last.ckpt"
    line = one_line_error(fit(tmp_path, *files, f"--data.init_args.train_file={grown}", "--trainer.max_steps=4",
                              f"--ckpt_path={last}"))
    assert "cannot resume mid-epoch 0 (2 batches trained on)" in line and "16 -> 24 training pairs" in line
    assert "epoch boundary" in line


def test_a_mid_epoch_checkpoint_is_evaluated_without_its_training_data(tmp_path, data):
    """`test` and `validate` of a checkpoint saved mid-epoch (a best-*.ckpt at a mid-epoch validation, a last.ckpt
    of max_steps) read no training position: the run's training data need not be loaded, or even exist."""
    files = [f"--data.init_args.val_file={data['val']}", f"--data.init_args.test_file={data['test']}"]
    ok(fit(tmp_path, *files, f"--data.init_args.train_file={data['train']}", "--trainer.max_steps=2"))
    last = tmp_path / "runs/demo/dpo/version_0/checkpoints/last.ckpt"
    tested = ok(fit(tmp_path, *files, f"--data.init_args.train_file={tmp_path / 'gone.json'}", f"--ckpt_path={last}",
                    program="test"))
    assert "test/loss" in tested.stdout
    ok(fit(tmp_path, *files, f"--data.init_args.train_file={data['train']}", f"--ckpt_path={last}", program="validate"))


@pytest.mark.parametrize("n", [16, 15])
@pytest.mark.parametrize(("before", "after"), [((4, 1), (4, 2)), ((2, 2), (4, 1)), ((4, 2), (3, 3))])
def test_the_rest_of_an_epoch_is_shared_by_any_number_of_ranks(n, before, after):
    """(batch size, ranks) at the checkpoint -> at the resume: the ranks' remaining pairs are the epoch's pairs not yet
    trained on, each once (plus DistributedSampler's padding repeats when they do not divide evenly)."""
    from lightning_meddpo.data.datamodule import EpochSampler, ResumePoint

    dataset = list(range(n))

    class Items(list):
        epoch = 0

    (b0, w0), (b1, w1) = before, after
    point = ResumePoint(epoch=1, batches=1, batch_size=b0, replicas=w0)
    old = [EpochSampler(Items(dataset), True, seed=3, num_replicas=w0, rank=r, batch_size=b0) for r in range(w0)]
    for s in old:
        s.set_epoch(1)
    seen = {i for s in old for i in list(s)[:b0]}
    new = [EpochSampler(Items(dataset), True, seed=3, num_replicas=w1, rank=r, batch_size=b1,
                        resume_point=lambda epoch: point) for r in range(w1)]
    parts = []
    for s in new:
        s.set_epoch(1)
        parts.append(list(s))
    rest = [i for part in parts for i in part]
    assert len({len(part) for part in parts}) == 1  # every rank steps the same number of times
    assert set(rest) == set(dataset) - seen and len(seen) == b0 * w0
    assert len(rest) - len(set(rest)) == -len(set(rest)) % w1  # only the padding repeats
