"""Preference-pair construction: the lexicon perturbations and build_pairs end to end on real files."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pydicom
import pydicom.data
import pytest
from PIL import Image
from skimage import data as skdata

from lightning_meddpo.commands.build_pairs import BuildSummary, build_pairs
from lightning_meddpo.commands.perturb import applicable_error_types, perturb_answer
from lightning_meddpo.data.images import corrupt, load_image
from lightning_meddpo.data.lexicon import ERROR_TYPES, LEXICON
from lightning_meddpo.data.records import RecordError, read_preference_file


def _all(answer, error_type):
    """Every rejected answer one error type can make (drawn with many seeds)."""
    out = set()
    for s in range(40):
        r = perturb_answer(answer, np.random.default_rng(s), [error_type])
        if r is not None:
            assert r[1] == error_type
            out.add(r[0])
    return out


@pytest.mark.parametrize(
    "answer, error_type, expected",
    [
        ("There is a nodule in the left lung.", "laterality", {"There is a nodule in the right lung."}),
        ("Left-sided effusion, larger than the right.", "laterality", {"Right-sided effusion, larger than the left."}),
        ("BILATERAL infiltrates.", "laterality", {"UNILATERAL infiltrates."}),
        ("No.", "presence", {"Yes."}),
        ("There is no evidence of pneumothorax.", "presence", {"There is evidence of pneumothorax."}),
        ("There is a fracture of the rib.", "presence", {"There is no fracture of the rib."}),
        ("The mass is in the upper lobe.", "anatomy", {"The mass is in the lower lobe."}),
    ],
)
def test_lexicon_exact(answer, error_type, expected):
    assert _all(answer, error_type) == expected


def test_lexicon_groups_and_case():
    organ = _all("This is an MRI of the brain.", "anatomy")
    assert "This is an MRI of the liver." in organ and all("brain" not in o for o in organ)
    modality = _all("This is an MRI of the brain.", "modality")
    assert "This is a CT of the brain." in modality and "This is an X-ray of the brain." in modality  # a/an fixed
    assert _all("CT shows a mass.", "modality") >= {"Ultrasound shows a mass.", "MRI shows a mass."}
    sizes = _all("A small nodule of 4 mm.", "size_count")
    assert "A large nodule of 4 mm." in sizes and "A small nodule of 8 mm." in sizes
    assert "Three nodules." in _all("Two nodules.", "size_count")
    assert "3.0 cm" in " ".join(_all("A 1.5 cm cyst.", "size_count"))
    # whole words only: "leftover", "rightly", "CTA" are not terms
    assert applicable_error_types("Leftover contrast, rightly noted in the CTA report") == []


def test_perturb_seeded_and_never_identity():
    answer = "CT shows a 3 cm mass in the left kidney; there is no lymphadenopathy."
    assert set(applicable_error_types(answer)) == set(ERROR_TYPES)
    a = perturb_answer(answer, np.random.default_rng(5))
    assert a == perturb_answer(answer, np.random.default_rng(5))
    assert perturb_answer(answer, random.Random(1)) == perturb_answer(answer, random.Random(1))
    draws = {perturb_answer(answer, np.random.default_rng(s)) for s in range(60)}
    assert {et for _, et in draws} == set(ERROR_TYPES)  # every applicable type gets drawn
    assert all(r != answer for r, _ in draws)
    assert perturb_answer("Axial view.", np.random.default_rng(0)) is None
    assert perturb_answer("", np.random.default_rng(0)) is None
    with pytest.raises(ValueError, match="unknown error type"):
        perturb_answer(answer, np.random.default_rng(0), ["colour"])
    assert json.loads(json.dumps(LEXICON)) == LEXICON  # the lexicon is plain JSON data


# ------------------------------------------------------------------------------------------- build_pairs


@pytest.fixture()
def image_root(tmp_path):
    root = tmp_path / "imgs"
    (root / "images").mkdir(parents=True)
    Image.fromarray(skdata.retina()[::16, ::16]).save(root / "images" / "retina.png")
    Image.fromarray(skdata.immunohistochemistry()[::8, ::8]).save(root / "images" / "ihc.jpg")
    ct = pydicom.dcmread(os.path.join(os.path.dirname(pydicom.data.__file__), "test_files", "CT_small.dcm"))
    Image.fromarray(ct.pixel_array.astype(np.uint16)).save(root / "images" / "ct16.png")
    full = (root / "images" / "retina.png").read_bytes()
    (root / "images" / "truncated.png").write_bytes(full[: len(full) // 2])
    return root


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


LLAVA_MED = [
    {"question_id": 1, "image": "images/ct16.png", "text": "Where is the nodule?",
     "answer": "There is a nodule in the left lung.", "answer_type": "OPEN"},
    {"question_id": 2, "image": "images/retina.png", "text": "Is this image abnormal?", "answer": "Yes",
     "answer_type": "CLOSED"},
    {"question_id": 3, "image": "images/ihc.jpg", "text": "What stain is this?",
     "gpt4_answer": "Immunohistochemistry with DAB.", "answer_type": "OPEN"},  # unperturbable
    {"question_id": 4, "image": "images/missing.png", "text": "Q?", "answer": "Left lung."},
    {"question_id": 5, "image": "images/truncated.png", "text": "Q?", "answer": "Left lung."},
]


def test_build_pairs_llava_med_both(tmp_path, image_root):
    src = _jsonl(tmp_path / "vqa.jsonl", LLAVA_MED)
    out = tmp_path / "out" / "pairs.json"
    s = build_pairs(src, image_root, out, mode="both", corruption={"type": "diffusion", "t": 500}, seed=1,
                    progress=False)
    assert isinstance(s, BuildSummary)
    assert s.read == 5 and s.written == {"text": 2, "image": 3}
    assert s.skipped == {"image file not found": 1, "image file cannot be decoded": 1,
                         "text: no lexicon term of the requested error types in the answer": 1}
    assert "3" in s.summary() and "image file not found" in s.summary()
    recs = json.loads(out.read_text())
    assert len(recs) == 5 and len({r["id"] for r in recs}) == 5
    for r in recs:
        assert r["conversations"][:-1] == r["rejected_conversations"][:-1]
        assert "<image>" in r["conversations"][0]["value"]
        if r["pair_type"] == "text":
            assert r["rejected_conversations"][-1]["value"] != r["conversations"][-1]["value"]
            assert r["error_type"] in ERROR_TYPES
        else:
            assert r["rejected_conversations"] == r["conversations"]
            assert not os.path.isabs(r["rejected_image"]) and r["rejected_image"].endswith(".png")
            assert not (image_root / r["rejected_image"]).exists()  # the source image folder is only read
            bad = Image.open(out.parent / r["rejected_image"])
            redo, _ = corrupt(load_image(image_root / r["image"]), r["corruption"]["spec"], r["corruption"]["seed"])
            assert np.array_equal(np.asarray(bad.convert("RGB")), np.asarray(redo))  # provenance reproduces it
    t1 = next(r for r in recs if r["id"] == "1-text")
    assert t1["answer_type"] == "OPEN" and t1["source_id"] == "1"
    # the output is readable by the preference loader with the two roots
    records, report = read_preference_file(out, image_root, rejected_image_root=out.parent)
    assert report.read == 5 and {r.pair_type for r in records} == {"text", "image"}
    # same seed -> same bytes; another seed -> different pairs
    out2 = tmp_path / "again.json"
    build_pairs(src, image_root, out2, mode="both", corruption={"type": "diffusion", "t": 500}, seed=1,
                progress=False)
    assert json.loads(out2.read_text()) == recs


def test_build_pairs_conversations_text_and_rewriter(tmp_path, image_root):
    rows = [
        {"id": "a", "image": "images/retina.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": "A fundus photograph."},
            {"from": "human", "value": "Which eye is it?"},
            {"from": "gpt", "value": "The left eye; the optic disc is small."}]},
        {"id": "b", "image": "images/ct16.png", "conversations": [
            {"from": "human", "value": "What modality?"}, {"from": "gpt", "value": "CT of the chest."}]},
    ]
    src = tmp_path / "conv.json"
    src.write_text(json.dumps(rows))
    out = tmp_path / "conv_pairs.jsonl"
    s = build_pairs(src, image_root, out, mode="text", error_types=["laterality", "modality"], progress=True)
    assert s.written == {"text": 2} and s.placeholder_inserted == 1
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    a = next(r for r in recs if r["source_id"] == "a")
    assert a["error_type"] == "laterality" and len(a["conversations"]) == 4
    assert a["rejected_conversations"][-1]["value"] == "The right eye; the optic disc is small."
    b = next(r for r in recs if r["source_id"] == "b")
    assert b["conversations"][0]["value"] == "<image>\nWhat modality?" and b["error_type"] == "modality"

    seen = []

    def rewriter(question, answer):
        seen.append(question)
        return answer if "modality" in question else "The right eye; no abnormality."

    out2 = tmp_path / "rw.json"
    s = build_pairs(src, image_root, out2, mode="text", rewriter=rewriter, progress=False)
    assert seen == ["Which eye is it?", "What modality?"]
    assert s.written == {"text": 1} and s.skipped == {"text: rewriter returned the answer unchanged": 1}
    assert json.loads(out2.read_text())[0]["error_type"] == "rewriter"


def test_build_pairs_image_crop_caption(tmp_path, image_root):
    src = _jsonl(tmp_path / "cap.jsonl", [{"id": "c/1", "image_path": ["images/ihc.jpg"], "caption": "IHC stain."}])
    out = tmp_path / "img.json"
    s = build_pairs(src, image_root, out, mode="image", progress=False, rejected_image_dir="neg")
    (r,) = json.loads(out.read_text())
    assert s.written == {"image": 1} and r["pair_type"] == "image" and r["corruption"]["type"] == "crop"
    assert r["rejected_image"].startswith("neg/crop/") and (out.parent / r["rejected_image"]).is_file()
    assert 0.01 <= r["corruption"]["resolved"]["area_fraction"] <= 0.2


@pytest.mark.parametrize("bad", ["/etc/passwd.png", "../outside.png", "images/../../x.png"])
def test_paths_escaping_the_root_are_refused(tmp_path, image_root, bad):
    src = _jsonl(tmp_path / "bad.jsonl", [{"question_id": "q9", "image": bad, "text": "Q", "answer": "left"}])
    with pytest.raises(RecordError, match=r"q9.*'image'.*escapes the image root"):
        build_pairs(src, image_root, tmp_path / "o.json", mode="text", progress=False)
    s = build_pairs(src, image_root, tmp_path / "o.json", mode="text", progress=False, skip_invalid=True)
    assert s.skipped == {"invalid record: field image": 1} and json.loads((tmp_path / "o.json").read_text()) == []


def test_refuses_to_overwrite_input(tmp_path, image_root):
    src = _jsonl(tmp_path / "in.jsonl", LLAVA_MED[:1])
    with pytest.raises(ValueError, match="is the input file"):
        build_pairs(src, image_root, src, progress=False)
    assert json.loads(src.read_text().splitlines()[0]) == LLAVA_MED[0]


def test_malformed_record_named(tmp_path, image_root):
    src = _jsonl(tmp_path / "m.jsonl", [{"id": "z", "image": "images/ct16.png", "question": "?"}])
    with pytest.raises(RecordError, match=r"m.jsonl:1 id='z'"):
        build_pairs(src, image_root, tmp_path / "o.json", progress=False)


def test_build_pairs_region_noise_from_record(tmp_path, image_root):
    W, H = Image.open(image_root / "images" / "retina.png").size
    mask = np.zeros((H, W), np.uint8)
    mask[10:30, 40:70] = 255
    (image_root / "masks").mkdir()
    Image.fromarray(mask).save(image_root / "masks" / "m.png")
    rows = [
        {"id": "box", "image": "images/retina.png", "caption": "Fundus.", "region": {"box": [5, 5, 25, 25]}},
        {"id": "mask", "image": "images/retina.png", "caption": "Fundus.", "region": {"mask": "masks/m.png"}},
        {"id": "none", "image": "images/retina.png", "caption": "Fundus."},
    ]
    out = tmp_path / "r.jsonl"
    build_pairs(_jsonl(tmp_path / "in.jsonl", rows), image_root, out, mode="image",
                corruption={"type": "region_noise", "std": 0.4}, progress=False)
    recs = {r["source_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    orig = np.asarray(load_image(image_root / "images" / "retina.png"))
    for rid, region in [("box", (slice(5, 25), slice(5, 25))), ("mask", (slice(10, 30), slice(40, 70))),
                        ("none", (slice(H // 4, H // 4 + H // 2), slice(W // 4, W // 4 + W // 2)))]:
        got = np.asarray(Image.open(out.parent / recs[rid]["rejected_image"]).convert("RGB"))
        inside = np.zeros((H, W), bool)
        inside[region] = True
        assert np.array_equal(got[~inside], orig[~inside]) and (got[inside] != orig[inside]).any(), rid
    assert recs["none"]["corruption"]["resolved"]["region"] == "fallback_centre_half"
    prov = recs["mask"]["corruption"]
    assert prov["spec"]["mask"]["file"] == "masks/m.png"
    from lightning_meddpo.data.images import reproduce
    again = reproduce(Image.fromarray(orig), prov, mask=mask > 0)
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(out.parent / recs["mask"]["rejected_image"])))
    bad = _jsonl(tmp_path / "bad.jsonl", [{"id": "x", "image": "images/retina.png", "caption": "c",
                                           "region": {"box": [500, 500, 600, 600]}}])
    with pytest.raises(RecordError, match=r"id='x'.*'region'"):
        build_pairs(bad, image_root, tmp_path / "o.json", mode="image", corruption="region_noise", progress=False)


def test_yes_no_only_as_whole_leading_word():
    assert _all("No evidence of pneumothorax.", "presence") == {"Evidence of pneumothorax."}
    assert _all("Yes, there is a fracture.", "presence") == {"No, there is a fracture.", "Yes, there is no fracture."}


def test_answer_field_named_in_errors(tmp_path, image_root):
    rows = [{"question_id": "q", "image": "images/ct16.png", "text": "Q?", "gpt4_answer": ["a", "b"]}]
    with pytest.raises(RecordError, match=r"id='q': field 'gpt4_answer'"):
        build_pairs(_jsonl(tmp_path / "a.jsonl", rows), image_root, tmp_path / "o.json", progress=False)
    rows = [{"id": "c", "image": "images/ct16.png", "conversations": [
        {"from": "human", "value": "Q"}, {"from": "gpt", "value": "left"}, {"from": "human", "value": "more?"}]}]
    with pytest.raises(RecordError, match=r"conversations\[2\]"):
        build_pairs(_jsonl(tmp_path / "b.jsonl", rows), image_root, tmp_path / "o.json", progress=False)
