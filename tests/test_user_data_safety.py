"""The demo never writes into a folder of the user's files, whatever a config points it at."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lightning_meddpo.demo.synthetic import (
    DemoFolderError,
    demo_for_files,
    ensure_demo_dataset,
    generate_demo_dataset,
)
from tests.conftest import REPO

SMALL = {"n_train": 4, "n_val": 2, "n_test": 2}


def user_folder(root: Path) -> Path:
    """A user's own preference data: one record, one image."""
    folder = root / "my_data"
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32), (10, 20, 30)).save(folder / "images" / "a.png")
    record = {"id": "mine-0", "image": "images/a.png",
              "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A lung."}],
              "rejected_conversations": [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A liver."}]}
    (folder / "train.json").write_text(json.dumps([record]))
    return folder


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generators_refuse_a_folder_of_other_files(tmp_path):
    folder = user_folder(tmp_path)
    before = digest(folder)
    for build in (generate_demo_dataset, ensure_demo_dataset):
        with pytest.raises(DemoFolderError, match="demo=false"):
            build(folder, **SMALL)
    assert digest(folder) == before
    generate_demo_dataset(tmp_path / "new", **SMALL)  # absent: built
    empty = tmp_path / "empty"
    empty.mkdir()
    ensure_demo_dataset(empty, **SMALL)  # empty: built
    ensure_demo_dataset(empty, **{**SMALL, "n_train": 5})  # an earlier demo build: rebuilt
    assert len(json.loads((empty / "train.json").read_text())) == 5


def test_demo_files_must_be_the_demos_own(tmp_path):
    demo = tmp_path / "demo"
    with pytest.raises(DemoFolderError, match="not files of the synthetic demo"):
        demo_for_files([str(demo / "train.json"), str(tmp_path / "elsewhere" / "val.json")], **SMALL)
    with pytest.raises(DemoFolderError, match="not files of the synthetic demo"):
        demo_for_files([str(demo / "mine.json")], **SMALL)
    assert not demo.exists()
    paths = demo_for_files([str(demo / "train.json"), str(demo / "val.json"), None], **SMALL)
    assert paths["train"].is_file()


def test_demo_config_pointed_at_user_data_stops_and_touches_nothing(tmp_path):
    """`fit --config configs/formulations/dpo.yaml --config configs/backbones/demo.yaml --data.init_args.train_file=MY/train.json` must not regenerate MY/."""
    folder = user_folder(tmp_path)
    before = digest(folder)
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_meddpo", "fit", "--config", "configs/formulations/dpo.yaml", "--config", "configs/backbones/demo.yaml",
         f"--data.init_args.train_file={folder / 'train.json'}", f"--trainer.default_root_dir={tmp_path / 'runs'}",
         f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "--trainer.max_steps=1"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode != 0
    assert "--data.init_args.demo=false" in proc.stderr + proc.stdout
    assert digest(folder) == before
