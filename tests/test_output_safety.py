"""Users' files stay sacred on the way out (through the CLI, as subprocesses): export never replaces a model
unasked, a full disk is one line naming the path with the previous files intact and no partial left, a checkpoint
of an older version resumes at the next epoch boundary, and pairs that only differ beyond max_length are caught."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_meddpo.checkpoints import WriteError, read_checkpoint_meta, write_text_atomic
from lightning_meddpo.demo.synthetic import generate_demo_dataset
from tests.conftest import REPO

STEPS_PER_EPOCH = 4  # 16 pairs, batch 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate_demo_dataset(tmp_path_factory.mktemp("output_data"), n_train=16, n_val=4, n_test=4)


def limited(max_bytes: int):
    """For a subprocess: no file it writes may grow past `max_bytes` (a full disk, as the writer sees it: EFBIG)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


def cli(root: Path, *args: str, max_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_meddpo", *args], cwd=root, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)},
                          preexec_fn=limited(max_file_bytes) if max_file_bytes else None)


def fit(root: Path, data: dict, *args: str, method: str = "dpo", max_file_bytes: int | None = None):
    ckpt = root / "ckpt"
    saver = {"class_path": "lightning_meddpo.callbacks.ResumableCheckpoint",
             "init_args": {"dirpath": str(ckpt), "save_last": True, "save_top_k": 0, "last_every_n_steps": 1}}
    run = root / "run.yaml"
    run.write_text(json.dumps({"trainer": {"callbacks": [saver], "logger": False}}))
    return cli(root, "fit", "--config", str(REPO / f"configs/formulations/{method}.yaml"), "--config",
               str(REPO / "configs/backbones/demo.yaml"), "--config", str(run), "--data.init_args.demo=false",
               f"--data.init_args.train_file={data['train']}", f"--data.init_args.val_file={data['val']}",
               "--data.init_args.batch_size=4", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
               "--trainer.enable_progress_bar=false", *args, max_file_bytes=max_file_bytes)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    (line,) = [line for line in proc.stderr.splitlines() if ": error: " in line]
    return line


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data) -> Path:
    """A run of 2 steps: its last.ckpt."""
    root = tmp_path_factory.mktemp("trained")
    ok(fit(root, data, "--trainer.max_steps=2"))
    return root / "ckpt" / "last.ckpt"


def test_export_never_overwrites_a_model_unasked(tmp_path, trained):
    users = tmp_path / "my_model"
    users.mkdir()
    (users / "config.json").write_text('{"model_type": "mine"}')
    (users / "model.safetensors").write_bytes(b"my weights")
    line = one_line_error(cli(tmp_path, "export", "--ckpt_path", str(trained), "--out", str(users)))
    assert str(users) in line and "not empty" in line and "--overwrite" in line
    assert (users / "model.safetensors").read_bytes() == b"my weights"

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    line = one_line_error(cli(tmp_path, "export", "--ckpt_path", str(trained), "--out", str(a_file)))
    assert str(a_file) in line and "an existing file" in line and a_file.read_text() == "mine"

    line = one_line_error(cli(tmp_path, "export", "--ckpt_path", str(trained), "--out", str(trained.parent), "--overwrite"))
    assert "holds the checkpoint" in line and trained.is_file()

    ok(cli(tmp_path, "export", "--ckpt_path", str(trained), "--out", str(users), "--overwrite"))
    assert not (users / "model.safetensors").read_bytes() == b"my weights"
    assert json.loads((users / "config.json").read_text())["model_type"] == "llava"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing left beside it


def test_a_full_disk_is_one_line_and_leaves_the_previous_files(tmp_path, data, trained):
    root = tmp_path / "run"
    root.mkdir()
    (root / "ckpt").mkdir()
    last = root / "ckpt" / "last.ckpt"
    last.write_bytes(trained.read_bytes())
    size = last.stat().st_size
    line = one_line_error(fit(root, data, "--trainer.max_steps=4", f"--ckpt_path={last}", max_file_bytes=size // 2))
    assert f"cannot write the checkpoint {last}" in line and "File too large" in line and "intact" in line
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no partial file left
    assert read_checkpoint_meta(last)["global_step"] == 2  # the previous one loads

    out = tmp_path / "hf"
    line = one_line_error(cli(tmp_path, "export", "--ckpt_path", str(trained), "--out", str(out), max_file_bytes=size // 8))
    assert f"cannot write the exported model {out}" in line and "File too large" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # neither the folder nor a partial one

    cache = tmp_path / "cache_file"  # a reference cache that cannot be written (its folder is a file)
    cache.write_text("")
    line = one_line_error(fit(root, data, "--trainer.max_steps=1", "--model.init_args.reference=precomputed",
                              f"--model.init_args.reference_cache_dir={cache}"))
    assert f"cannot write the reference log-probs {cache}/" in line


def test_write_text_atomic_names_the_path_and_leaves_no_partial(tmp_path):
    target = tmp_path / "summary.md"
    target.write_text("before")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))  # a full disk for this process, for a moment
    try:
        with pytest.raises(WriteError, match=f"cannot write the summary {target}: File too large .the previous one is intact"):
            write_text_atomic(target, "x" * 5000, "the summary")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert target.read_text() == "before" and [p.name for p in tmp_path.iterdir()] == ["summary.md"]
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(WriteError, match=f"cannot write the summary {blocker}/summary.md: "):
        write_text_atomic(blocker / "summary.md", "after", "the summary")
    write_text_atomic(target, "after", "the summary")
    assert target.read_text() == "after" and sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "summary.md"]


def test_an_older_checkpoint_resumes_at_the_next_epoch_boundary(tmp_path, data):
    """A checkpoint without the DataModule's position, resumed mid-epoch: the rest of that epoch is left out (a
    warning says so), never replayed in another order that trains some pairs twice and others never."""
    full_log, resumed_log = tmp_path / "full.jsonl", tmp_path / "resumed.jsonl"
    logged = lambda path: f'--trainer.callbacks+={{"class_path": "tests.batch_log.BatchLog", "init_args": {{"path": "{path}"}}}}'
    full = tmp_path / "full"
    full.mkdir()
    ok(fit(full, data, "--trainer.max_steps=12", logged(full_log)))
    part = tmp_path / "part"
    part.mkdir()
    ok(fit(part, data, "--trainer.max_steps=6"))  # mid-way through epoch 1
    state = torch.load(part / "ckpt" / "last.ckpt", weights_only=True)
    del state["PreferenceDataModule"]  # as an older version wrote it
    old = tmp_path / "old.ckpt"
    torch.save(state, old)
    proc = ok(fit(part, data, "--trainer.max_steps=10", f"--ckpt_path={old}", logged(resumed_log)))
    assert "has no data position" in proc.stderr and "resumes at the next epoch boundary" in proc.stderr
    seen_full = [json.loads(line) for line in full_log.read_text().splitlines()]
    seen_resumed = [json.loads(line) for line in resumed_log.read_text().splitlines()]
    assert [(e, ids) for _, e, ids in seen_resumed] == [(e, ids) for _, e, ids in seen_full[2 * STEPS_PER_EPOCH:]]
    assert [s for s, _, _ in seen_resumed] == list(range(6, 10))


def test_pairs_identical_once_truncated_are_caught(tmp_path, data):
    records = json.loads(Path(data["train"]).read_text())
    tail = " The finding is further described in the report below with more words to fill the answer."
    for r in records:  # the same long answer on both sides, differing only in its last words
        answer = r["conversations"][-1]["value"] + tail * 3
        r["conversations"][-1]["value"] = answer + " It is left."
        r["rejected_conversations"][-1]["value"] = answer + " It is right."
    train = Path(data["root"]) / "long_tail.json"
    train.write_text(json.dumps(records))
    args = [f"--data.init_args.train_file={train}", f"--data.init_args.val_file={train}", "--trainer.max_steps=1",
            "--data.init_args.max_length=64"]
    proc = fit(tmp_path, data, *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "carry no preference signal" in proc.stderr and "once both are truncated to fit max_length=64" in proc.stderr
    proc = fit(tmp_path, data, *args, "--data.init_args.skip_invalid=true")
    assert proc.returncode == 2 and "no usable records left" in proc.stderr, proc.stderr[-3000:]
    assert "16 skipped: no preference signal for the formulation once truncated to max_length" in proc.stderr
