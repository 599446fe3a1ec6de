"""The synthetic demo dataset: deterministic, valid in the paper's format, and visually grounded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning_meddpo.data.records import read_preference_file
from lightning_meddpo.demo.synthetic import (
    LESION_VALUE,
    MARKER_NAME,
    demo_corpus,
    ensure_demo_dataset,
    generate_demo_dataset,
)

SMALL = {"n_train": 48, "n_val": 16, "n_test": 16}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    return generate_demo_dataset(tmp_path_factory.mktemp("synth"), **SMALL)


def _records(paths: dict[str, Path], split: str) -> list[dict]:
    return json.loads(paths[split].read_text())


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _lesion_centroid_x(path: Path) -> float | None:
    """Mean x of the pure-white lesion pixels, as a fraction of the width; None when there is no lesion."""
    arr = np.asarray(Image.open(path).convert("RGB"))
    mask = (arr >= LESION_VALUE).all(axis=2)
    if not mask.any():
        return None
    return float(np.nonzero(mask)[1].mean() + 0.5) / arr.shape[1]


def test_two_builds_are_byte_identical(tmp_path):
    a = generate_demo_dataset(tmp_path / "a", seed=3, **SMALL)
    b = generate_demo_dataset(tmp_path / "b", seed=3, **SMALL)
    da, db = _tree_digest(a["root"]), _tree_digest(b["root"])
    assert da == db and len(da) > 2 * sum(SMALL.values())
    c = generate_demo_dataset(tmp_path / "c", seed=4, **SMALL)
    assert _tree_digest(c["root"]) != da


def test_returned_layout(built):
    for key in ("root", "images", "train", "val", "test", "vqa_test"):
        assert built[key].exists(), key
    assert (built["root"] / MARKER_NAME).is_file()
    assert len(_records(built, "train")) == SMALL["n_train"]


def test_splits_are_disjoint(built):
    ids, images, digests = {}, {}, {}
    for split in ("train", "val", "test"):
        recs = _records(built, split)
        ids[split] = {r["id"] for r in recs}
        assert len(ids[split]) == len(recs)
        images[split] = {r["image"] for r in recs} | {r["rejected_image"] for r in recs}
        digests[split] = {hashlib.sha256((built["root"] / p).read_bytes()).hexdigest() for p in images[split]}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not ids[a] & ids[b]
        assert not images[a] & images[b]
        assert not digests[a] & digests[b]


def test_records_are_valid_paper_format(built):
    for split in ("train", "val", "test"):
        raw = _records(built, split)
        for r in raw:
            for conv in ("conversations", "rejected_conversations"):
                assert r[conv][-1]["from"] == "gpt"
                assert "<image>" in r[conv][0]["value"]
            assert r["conversations"][-1]["value"] != r["rejected_conversations"][-1]["value"]
            assert r["pair_type"] == "text"
            assert 0.0 < r["weighted_score"] <= 1.0
            assert r["error_type"] in {"laterality", "missed_lesion", "invented_lesion",
                                       "wrong_modality", "wrong_organ"}
            for key in ("image", "rejected_image"):
                with Image.open(built["root"] / r[key]) as im:
                    im.load()
                    assert im.mode == "RGB" and im.size == (32, 32)
        # The project's own reader accepts every record as-is (no placeholder inserted, nothing skipped).
        records, report = read_preference_file(built[split], built["root"])
        assert report.read == len(raw) and report.placeholder_inserted == 0 and not report.skipped
        assert all(rec.rejected_image is not None and rec.pair_type == "text" for rec in records)


def test_answers_depend_on_the_image(built):
    recs = [r for s in ("train", "val", "test") for r in _records(built, s)]
    kinds = {r["question_type"] for r in recs}
    assert kinds == {"presence", "side", "modality", "organ"}
    for r in recs:
        chosen = r["conversations"][-1]["value"]
        x = _lesion_centroid_x(built["root"] / r["image"])
        x_bad = _lesion_centroid_x(built["root"] / r["rejected_image"])
        if r["question_type"] == "side":
            side = "left" if "left" in chosen else "right"
            assert x is not None and (x < 0.5) == (side == "left"), r["id"]
            assert x_bad is not None and (x_bad < 0.5) != (side == "left"), r["id"]
        elif r["question_type"] == "presence":
            assert (x is not None) == chosen.startswith("Yes"), r["id"]
            if x is not None:
                assert (x < 0.5) == ("left" in chosen), r["id"]
            # the rejected image contradicts the chosen answer: lesion removed, moved or invented
            assert x_bad is None or x is None or (x_bad < 0.5) != (x < 0.5), r["id"]
        else:
            # modality / organ: the corrupted image differs, the lesion stays where it was
            assert (x is None) == (x_bad is None), r["id"]
            if x is not None:
                assert abs(x - x_bad) < 0.1
            a = np.asarray(Image.open(built["root"] / r["image"]), dtype=np.int16)
            b = np.asarray(Image.open(built["root"] / r["rejected_image"]), dtype=np.int16)
            assert np.abs(a - b).mean() > 5, r["id"]


def test_image_pair_fraction(tmp_path):
    paths = generate_demo_dataset(tmp_path, image_pair_fraction=0.25, **SMALL)
    train = _records(paths, "train")
    image_pairs = [r for r in train if r["pair_type"] == "image"]
    assert len(image_pairs) == SMALL["n_train"] // 4
    for r in image_pairs:
        assert r["rejected_conversations"][-1]["value"] == r["conversations"][-1]["value"]
        assert r["rejected_image"] != r["image"]
    for r in train:
        if r["pair_type"] == "text":
            assert r["rejected_conversations"][-1]["value"] != r["conversations"][-1]["value"]
    records, report = read_preference_file(paths["train"], paths["root"])
    assert sum(rec.pair_type == "image" for rec in records) == len(image_pairs)
    with pytest.raises(ValueError, match="image_pair_fraction"):
        generate_demo_dataset(tmp_path / "bad", image_pair_fraction=1.5)


def test_ensure_skips_a_complete_build_and_redoes_an_interrupted_one(tmp_path):
    first = ensure_demo_dataset(tmp_path, **SMALL)
    marker = tmp_path / MARKER_NAME
    stamp = (first["train"].stat().st_mtime_ns, marker.stat().st_mtime_ns)
    second = ensure_demo_dataset(tmp_path, **SMALL)
    assert second == first
    assert (first["train"].stat().st_mtime_ns, marker.stat().st_mtime_ns) == stamp

    first["train"].write_text("[]")  # different parameters rebuild
    ensure_demo_dataset(tmp_path, **{**SMALL, "seed": 1})
    assert len(_records(first, "train")) == SMALL["n_train"]

    # an interrupted build (its marker claimed the folder but was never completed) is redone
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "complete": False}))
    first["val"].write_text("[]")
    ensure_demo_dataset(tmp_path, **SMALL)
    assert len(_records(first, "val")) == SMALL["n_val"]
    with pytest.raises(TypeError, match="unknown"):
        ensure_demo_dataset(tmp_path, n_tran=3)


def test_vqa_test_file(built):
    lines = [json.loads(line) for line in built["vqa_test"].read_text().splitlines()]
    test = _records(built, "test")
    assert [q["question_id"] for q in lines] == [r["id"] for r in test]
    for q, r in zip(lines, test):
        assert set(q) == {"question_id", "image", "text", "answer", "answer_type", "question_type", "modality", "organ",
                          "lesion_side"}
        assert (q["question_type"], q["modality"], q["organ"], q["lesion_side"]) == (
            r["question_type"], r["modality"], r["organ"], r["lesion_side"])
        assert "<image>" not in q["text"] and q["text"] in r["conversations"][0]["value"]
        chosen = r["conversations"][-1]["value"]
        if chosen.startswith(("Yes", "No")):  # closed: a bare yes/no agreeing with the chosen answer
            assert q["answer_type"] == "CLOSED" and q["answer"] == chosen.split(",")[0].lower()
        else:  # open: the grounded word, which the chosen answer states
            assert q["answer_type"] == "OPEN" and q["answer"].lower() in chosen.lower() and " " not in q["answer"].strip()
        assert (built["root"] / q["image"]).is_file()


def test_corpus_covers_every_record_text(tmp_path):
    paths = generate_demo_dataset(tmp_path, image_pair_fraction=0.5, seed=7, **SMALL)
    corpus = set(demo_corpus())
    for split in ("train", "val", "test"):
        for r in _records(paths, split):
            for conv in ("conversations", "rejected_conversations"):
                for turn in r[conv]:
                    assert turn["value"].replace("<image>", "").strip() in corpus, turn["value"]


def test_no_text_only_shortcut(built):
    """Within each question type the correct answer varies, so only the image can decide it."""
    recs = [r for s in ("train", "val", "test") for r in _records(built, s)]
    for kind in ("presence", "side", "modality", "organ"):
        answers = [r["conversations"][-1]["value"] for r in recs if r["question_type"] == kind]
        counts = sorted(np.unique(answers, return_counts=True)[1].tolist())
        assert len(counts) >= 2 and counts[-1] <= 0.8 * len(answers), (kind, counts)


def test_image_size_is_configurable(tmp_path):
    paths = generate_demo_dataset(tmp_path, n_train=4, n_val=1, n_test=1, image_size=48)
    for r in _records(paths, "train"):
        with Image.open(paths["root"] / r["image"]) as im:
            assert im.size == (48, 48)
