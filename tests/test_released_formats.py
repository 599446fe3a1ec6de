"""Files shaped like the paper's released ones read as they are (records written here in their format)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from lightning_meddpo.commands.build_pairs import build_pairs
from lightning_meddpo.data.datamodule import PreferenceDataModule
from lightning_meddpo.eval.datamodule import read_eval_file

REPORT = "A moderate-sized left pleural effusion is present. The right lung is clear. There is no pneumothorax."


def images(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 32), (90, 90, 90)).save(root / name)


def test_mimic_cxr_train_file_with_image_paths_and_study_ids(tmp_path):
    """mimic-cxr-findings_train_5k_file_only.jsonl: study_id (no id), image_paths as a string or a list,
    label columns with NaN."""
    images(tmp_path, "a.jpg", "b.jpg", "c.jpg")
    lines = [
        f'{{"study_id": 57362181, "report": "{REPORT}", "image_paths": "a.jpg", "subject_id": 18505898, "Atelectasis": 1.0, "Cardiomegaly": NaN}}',
        f'{{"study_id": 57362182, "report": "{REPORT}", "image_paths": ["b.jpg", "c.jpg"], "Edema": NaN}}',
    ]
    src = tmp_path / "mimic_train.jsonl"
    src.write_text("\n".join(lines) + "\n")
    records, report = read_eval_file(src)
    assert [r.id for r in records] == [57362181, 57362182] and records[1].image == (tmp_path / "b.jpg").resolve()
    assert "image_paths lists of several images (the first was used)" in report.summary()
    summary = build_pairs(src, tmp_path, tmp_path / "out" / "pairs.json", mode="text", progress=False)
    written = json.loads((tmp_path / "out" / "pairs.json").read_text())
    assert summary.read == 2 and {r["source_id"] for r in written} <= {"57362181", "57362182"} and written
    assert {r["image"] for r in written} <= {"a.jpg", "b.jpg"}


def test_amboss_train_file_without_ids(tmp_path):
    """train_amboss_usmle_challenge.jsonl: image and caption only."""
    images(tmp_path, "images/180.jpg")
    src = tmp_path / "amboss_train.jsonl"
    src.write_text(json.dumps({"image": "images/180.jpg", "caption": "Ultrasound of the left liver lobe."}) + "\n")
    summary = build_pairs(src, tmp_path, tmp_path / "pairs.json", mode="text", progress=False)
    (pair,) = json.loads((tmp_path / "pairs.json").read_text())
    assert summary.total_written == 1 and pair["source_id"] == "amboss_train:1"


def test_one_record_with_only_train_file_says_why(tmp_path, demo_dir, tiny_processor):
    records = json.loads((demo_dir / "train.json").read_text())[:1]
    shutil.copytree(demo_dir / "images", tmp_path / "images")
    one = tmp_path / "one.json"
    one.write_text(json.dumps(records))
    dm = PreferenceDataModule(str(one), processor=tiny_processor)
    with pytest.raises(ValueError, match="leaves none to train on.*val_file"):
        dm.setup("fit")
    dm = PreferenceDataModule(str(one), val_file=str(one), processor=tiny_processor)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == len(dm.datasets["val"]) == 1
