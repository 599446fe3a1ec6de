"""Other input formats mapped to PreferenceRecord: TRL rows (JSON/JSONL/Parquet), `datasets` datasets
(save_to_disk directories with Image features, local files through load_dataset), and format detection."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data as skdata

from lightning_meddpo.data.datamodule import PreferenceDataModule
from lightning_meddpo.data.formats import detect_format, read_records
from lightning_meddpo.data.records import RecordError, Turn
from tests.conftest import image_token_count

Q = "Which lung has the nodule?"


def _msgs(question, answer=None, image=True):
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    out = [{"role": "user", "content": content}]
    if answer is not None:
        out.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return out


def _assistant(text):
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    (root / "images").mkdir()
    Image.fromarray(skdata.retina()[::16, ::16]).save(root / "images" / "retina.png")
    Image.fromarray(skdata.immunohistochemistry()[::8, ::8]).save(root / "images" / "ihc.png")
    return root


def trl_rows():
    return [
        {"id": "c1", "prompt": _msgs(Q), "chosen": _assistant("The left lung."), "rejected": _assistant("The right lung."),
         "images": ["images/retina.png"], "weighted_score": 0.7},
        {"prompt": "What stain is this?", "chosen": "DAB.", "rejected": "H&E.", "images": ["images/ihc.png"]},
    ]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_trl_jsonl_conversational_and_plain(root, tiny_processor):
    path = _jsonl(root / "trl.jsonl", trl_rows())
    assert detect_format(path) == "trl"
    records, report = read_records(path)
    a, b = records
    assert a.id == "c1" and a.prompt == (Turn("human", f"<image>\n{Q}"),) and a.chosen == "The left lung."
    assert a.rejected == "The right lung." and a.weighted_score == 0.7 and a.image == root / "images" / "retina.png"
    assert b.id == "trl-1" and b.prompt == (Turn("human", "<image>\nWhat stain is this?"),)  # placeholder inserted...
    assert report.read == 2 and report.placeholder_inserted == 1  # ...and counted
    dm = PreferenceDataModule(train_file=str(path), val_file=str(path), processor=tiny_processor, batch_size=2,
                              max_length=128)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    image_id = tiny_processor.tokenizer.convert_tokens_to_ids("<image>")
    assert ((batch.prompt.input_ids == image_id).sum(-1) == image_token_count(tiny_processor)).all()
    assert batch.weights is None  # only one record has a weight: no silent default


def test_trl_implicit_prompt_and_json_array(root):
    rows = [{"chosen": _msgs(Q, "Left."), "rejected": _msgs(Q, "Right."), "image": "images/retina.png"}]
    path = root / "implicit.json"
    path.write_text(json.dumps(rows))
    (rec,), _ = read_records(path, format="trl")
    assert rec.id == "implicit-0" and rec.chosen == "Left." and rec.rejected == "Right." and len(rec.prompt) == 1
    rows[0]["rejected"] = _msgs("Another question?", "Right.")
    path.write_text(json.dumps(rows))
    with pytest.raises(RecordError, match=r"implicit.json\[0\] id='implicit-0': field 'rejected': its turns"):
        read_records(path)


def test_trl_parquet(root):
    path = root / "trl.parquet"
    pq.write_table(pa.Table.from_pylist(trl_rows()[:1] + [dict(trl_rows()[0], id="c2")]), path)
    records, report = read_records(path)
    assert [r.id for r in records] == ["c1", "c2"] and records[0].prompt[0].text == f"<image>\n{Q}"
    assert records[0].source == f"{path}[row 0]"


def _image_dataset(root, n=4):
    imgs = [Image.fromarray(skdata.retina()[::16, ::16]), Image.fromarray(skdata.immunohistochemistry()[::8, ::8])]
    rows = {"id": [f"h{i}" for i in range(n)], "prompt": [_msgs(Q) for _ in range(n)],
            "chosen": [_assistant(f"Left, {i}.") for i in range(n)],
            "rejected": [_assistant(f"Right, {i}.") for i in range(n)],
            "images": [[imgs[i % 2]] for i in range(n)]}
    features = datasets.Features({
        "id": datasets.Value("string"),
        "prompt": datasets.List({"role": datasets.Value("string"),
                                 "content": datasets.List({"type": datasets.Value("string"),
                                                           "text": datasets.Value("string")})}),
        "chosen": datasets.List({"role": datasets.Value("string"),
                                 "content": datasets.List({"type": datasets.Value("string"),
                                                           "text": datasets.Value("string")})}),
        "rejected": datasets.List({"role": datasets.Value("string"),
                                   "content": datasets.List({"type": datasets.Value("string"),
                                                             "text": datasets.Value("string")})}),
        "images": datasets.List(datasets.Image()),
    })
    return datasets.Dataset.from_dict(rows, features=features), imgs


def test_hf_dataset_with_image_features(root, tiny_processor):
    ds, imgs = _image_dataset(root)
    single = root / "hf_single"
    ds.save_to_disk(str(single))
    assert detect_format(single) == "hf_dataset"
    records, report = read_records(single)
    assert report.read == 4 and isinstance(records[0].image, Image.Image)
    assert np.array_equal(np.asarray(records[1].image.convert("RGB")), np.asarray(imgs[1].convert("RGB")))
    assert records[0].source == f"{single}[0]" and records[0].prompt[0].text == f"<image>\n{Q}"

    dd = root / "hf_dict"
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(dd))
    with pytest.raises(RecordError, match="splits"):
        read_records(dd)
    dm = PreferenceDataModule(train_file=str(dd), test_file=str(dd), val_fraction=0.25, processor=tiny_processor,
                              batch_size=2, max_length=128, corruption="crop")
    dm.setup(None)
    assert len(dm.datasets["train"]) == 3 and len(dm.datasets["val"]) == 1 and len(dm.datasets["test"]) == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.pixel_values.shape[0] == 2 and batch.rejected_images is not None


def test_hf_dataset_from_local_file_via_load_dataset(root, monkeypatch, tmp_path):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    path = _jsonl(root / "trl_hf.jsonl", trl_rows())
    records, report = read_records(path, format="hf_dataset")
    assert [r.id for r in records] == ["c1", "trl_hf-1"] and report.placeholder_inserted == 1
    assert records[0].source == f"{path}[0]"


def test_dataset_object(root):
    ds, _ = _image_dataset(root, n=2)
    records, _ = read_records(ds)
    assert [r.id for r in records] == ["h0", "h1"] and isinstance(records[0].image, Image.Image)


@pytest.mark.parametrize("edit, field, problem", [
    (lambda r: r.__setitem__("images", ["images/retina.png", "images/ihc.png"]), "images",
     "2 images; exactly one image per pair"),
    (lambda r: r.__setitem__("images", []), "images", "0 images"),
    (lambda r: r.pop("images"), "images", "missing"),
    (lambda r: r.__setitem__("prompt", _msgs(Q) + [{"role": "user", "content": [{"type": "image"}]}]), "prompt",
     "2 <image> placeholders"),
    (lambda r: r.__setitem__("chosen", [{"role": "assistant", "content": [{"type": "image"}]}]), "chosen[0].content[0]",
     "an image part in a response"),
    (lambda r: r.__setitem__("prompt", [{"role": "system", "content": "Be brief."}] + _msgs(Q)), "prompt[0].role",
     "unsupported role 'system'"),
    (lambda r: r.__setitem__("rejected", _assistant("  ")), "rejected", "the response is empty"),
    (lambda r: r.__setitem__("rejected", r["chosen"]), "rejected", "equals the chosen one"),
    (lambda r: r.__setitem__("prompt", [{"role": "user", "content": [{"type": "video"}]}]), "prompt[0].content[0]",
     "expected {'type': 'image'}"),
])
def test_trl_errors_name_row_id_and_field(root, edit, field, problem):
    row = trl_rows()[0]
    edit(row)
    path = _jsonl(root / "bad_trl.jsonl", [trl_rows()[1], row])
    with pytest.raises(RecordError) as e:
        read_records(path)
    assert e.value.field_name == field and problem in e.value.problem
    assert str(e.value).startswith(f"{path}:2 id='c1': field {field!r}")
    records, report = read_records(path, skip_invalid=True)
    assert len(records) == 1 and report.n_skipped == 1 and "c1" in report.errors[0]


def test_unknown_fields_and_bad_format(root, tiny_processor):
    path = _jsonl(root / "what.jsonl", [{"question": "?", "answer": "x"}])
    with pytest.raises(RecordError, match=r"cannot tell the format from the fields \['answer', 'question'\]"):
        read_records(path)
    with pytest.raises(ValueError, match="data.format must be one of"):
        PreferenceDataModule(train_file=str(path), format="csv", processor=tiny_processor)
    paper = _jsonl(root / "paper_as_trl.jsonl", [{"id": "p", "image": "images/retina.png", "conversations": []}])
    with pytest.raises(RecordError, match="field 'chosen': missing"):
        read_records(paper, format="trl")


def test_dataset_images_stay_encoded_in_records(root, tiny_processor):
    ds, imgs = _image_dataset(root, n=2)
    path = root / "hf_lazy"
    ds.save_to_disk(str(path))
    dm = PreferenceDataModule(test_file=str(path), processor=tiny_processor, max_length=128)
    dm.setup("test")  # decodes every image once to validate it...
    rec = dm.datasets["test"].records[0]
    assert rec.image._im is None  # ...but the record keeps only the encoded bytes, not the pixels
    from lightning_meddpo.data.datamodule import load_record_image

    assert np.array_equal(np.asarray(load_record_image(rec)), np.asarray(imgs[0].convert("RGB")))
