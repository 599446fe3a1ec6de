"""The precomputed reference is exact or refused (through the CLI, as subprocesses): pairs are cached by what they
are (text and image bytes), never by their id or a file's size and time; a cache file that cannot be read is rebuilt
with one line; a cache write that fails leaves no half file."""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from lightning_meddpo.checkpoints import WriteError, writing
from lightning_meddpo.demo.synthetic import generate_demo_dataset
from lightning_meddpo.eval.tensorboard import read_scalars
from lightning_meddpo.reference_cache import ReferenceTable
from tests.conftest import REPO

LN2 = math.log(2)


@pytest.fixture()
def data(tmp_path):
    """16 train / 8 val pairs whose images are uncompressed PNGs (one byte size for all: a swapped image keeps it);
    the val records reuse the train records' ids, as files split by hand often do."""
    paths = generate_demo_dataset(tmp_path / "data", n_train=16, n_val=8, n_test=4)
    for png in paths["images"].glob("*.png"):
        with Image.open(png) as im:
            im.load()
            im.save(png, compress_level=0)
    train, val = json.loads(paths["train"].read_text()), json.loads(paths["val"].read_text())
    for t, v in zip(train, val):
        v["id"] = t["id"]
    paths["val"].write_text(json.dumps(val))
    return paths


def fit(root: Path, data: dict, name: str) -> subprocess.CompletedProcess:
    """One step of DPO with the precomputed reference, in file order; its logs under root/runs/<name>."""
    cmd = [sys.executable, "-m", "lightning_meddpo", "fit", "--config", str(REPO / "configs/formulations/dpo.yaml"),
           "--config", str(REPO / "configs/backbones/demo.yaml"), "--data.init_args.demo=false",
           f"--data.init_args.train_file={data['train']}", f"--data.init_args.val_file={data['val']}",
           "--data.init_args.batch_size=4", "--data.init_args.shuffle=false", "--trainer.max_steps=1",
           "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.log_every_n_steps=1",
           "--trainer.enable_progress_bar=false", "--model.init_args.reference=precomputed",
           f"--model.init_args.reference_cache_dir={root / 'cache'}", f"--trainer.logger.init_args.save_dir={root / 'runs'}",
           f"--trainer.logger.init_args.name={name}"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def first_loss(root: Path, name: str) -> float:
    (version,) = (root / "runs" / name).iterdir()
    return read_scalars(version)["train/loss_step"][0][1]


def cache_file(root: Path) -> Path:
    (path,) = (root / "cache").glob("*.json")
    return path


def test_the_cache_is_keyed_by_content(tmp_path, data):
    """At the first step the policy IS the reference: every pair's loss is exactly log 2, unless a reference
    log-prob of another pair was read (the val record of the same id, a stale entry for a replaced image)."""
    fit(tmp_path, data, "first")
    assert first_loss(tmp_path, "first") == pytest.approx(LN2, abs=1e-5)  # ids shared with val: 1.1101 when keyed by id
    assert len(ReferenceTable.load(cache_file(tmp_path))) == 16 + 8

    records = json.loads(data["train"].read_text())
    a, b = (data["root"] / records[i]["image"] for i in (0, 1))  # both in the first batch
    assert a.stat().st_size == b.stat().st_size
    times = [(p.stat().st_atime_ns, p.stat().st_mtime_ns) for p in (a, b)]
    swapped = b.read_bytes(), a.read_bytes()
    for path, content, ns in zip((a, b), swapped, times):
        path.write_bytes(content)
        os.utime(path, ns=ns)  # `cp -p`: the same size and modification time
    fit(tmp_path, data, "swapped")
    assert first_loss(tmp_path, "swapped") == pytest.approx(LN2, abs=1e-5)
    assert len(ReferenceTable.load(cache_file(tmp_path))) == 16 + 8 + 2  # the two changed pairs computed and added

    path = cache_file(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # cut short
    proc = fit(tmp_path, data, "torn")
    (line,) = [line for line in proc.stderr.splitlines() if "cannot be read" in line]
    assert str(path) in line and "rebuilding it" in line
    assert first_loss(tmp_path, "torn") == pytest.approx(LN2, abs=1e-5)
    assert len(ReferenceTable.load(path)) == 16 + 8


def test_a_cache_write_that_fails_leaves_no_half_file(tmp_path):
    table = ReferenceTable(("chosen",), {"chosen": {f"k{i}": -float(i) for i in range(2000)}})
    path = tmp_path / "cache" / "table.json"
    table.save(path, {})
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, hard))  # the disk fills up mid-write
    try:
        with pytest.raises(WriteError, match=f"cannot write the reference log-probs {path}: File too large"):
            with writing(path, "the reference log-probs"):
                ReferenceTable(("chosen",), {"chosen": {**table.values["chosen"], "new": 0.0}}).save(path, {})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == ["table.json"]


def test_duplicate_ids_in_one_file_are_refused_before_anything_is_computed(tmp_path, data):
    records = json.loads(data["train"].read_text())
    records[5]["id"] = records[2]["id"]
    data["train"].write_text(json.dumps(records))
    cmd = [sys.executable, "-m", "lightning_meddpo", "fit", "--config", str(REPO / "configs/formulations/dpo.yaml"),
           "--config", str(REPO / "configs/backbones/demo.yaml"), "--data.init_args.demo=false",
           f"--data.init_args.train_file={data['train']}", f"--data.init_args.val_file={data['val']}",
           "--trainer.max_steps=1", "--trainer.logger=false", "--model.init_args.reference=precomputed",
           f"--model.init_args.reference_cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert f"id={records[2]['id']!r}" in line and "duplicate of the record at" in line
    assert not (tmp_path / "cache").exists()  # nothing computed


def test_a_kill_during_a_cache_write_leaves_the_previous_file_or_none(tmp_path):
    """kill -9 while a large table is being written: the cache file is the previous one, whole (only a hidden
    temporary file can be left, which is never read)."""
    path = tmp_path / "table.json"
    ReferenceTable(("chosen",), {"chosen": {"old": -1.0}}).save(path, {})
    writer = ("import sys; from pathlib import Path; from lightning_meddpo.reference_cache import ReferenceTable\n"
              "t = ReferenceTable(('chosen',), {'chosen': {f'k{i:07d}': -float(i) for i in range(1_000_000)}})\n"
              "print('writing', flush=True)\nwhile True:\n    t.save(Path(sys.argv[1]), {})\n")
    proc = subprocess.Popen([sys.executable, "-c", writer, str(path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "writing"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(tmp_path.glob(".table.json.*.tmp")):
        time.sleep(0.005)  # until a write is under way
    proc.kill()
    proc.wait()
    table = ReferenceTable.load(path)  # parses: the old table, or a whole new one
    assert len(table) in (1, 1_000_000)
    assert all(p.name.startswith(".") for p in tmp_path.iterdir() if p != path)
