"""Bad input, one case per test, on real files: each is an error naming the file, the line or record id
and the field, or, with skip_invalid, a skip counted by reason in `dm.reports` and logged. Odd but valid
images (grayscale, 16-bit, RGBA) are converted, not refused."""

from __future__ import annotations

import json
import os

import numpy as np
import pydicom
import pydicom.data
import pytest
from PIL import Image
from skimage import data as skdata

from lightning_meddpo.data.collate import PromptTooLongError
from lightning_meddpo.data.datamodule import PreferenceDataModule
from lightning_meddpo.data.records import RecordError
from tests.conftest import image_token_count


@pytest.fixture()
def root(tmp_path):
    (tmp_path / "images").mkdir()
    Image.fromarray(skdata.retina()[::16, ::16]).save(tmp_path / "images" / "retina.png")  # 89x89 RGB
    return tmp_path


def rec(rid, image="images/retina.png", chosen="The nodule is in the left lung.",
        rejected="The nodule is in the right lung.", question="<image>\nWhere is the nodule?", **extra):
    return {"id": rid, "image": image,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": chosen}],
            "rejected_conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": rejected}],
            **extra}


def write(root, records, name="pairs.jsonl"):
    path = root / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def setup_dm(path, processor, **kw):
    dm = PreferenceDataModule(test_file=str(path), processor=processor, batch_size=2, max_length=kw.pop("max_length", 128), **kw)
    dm.setup("test")
    return dm


def expect(path, processor, line, rid, field, problem, reason, exc=RecordError, **kw):
    """Raises naming file:line, id and field; with skip_invalid: the two good records stay, one skip counted."""
    with pytest.raises(exc) as e:
        setup_dm(path, processor, **kw)
    msg = str(e.value)
    assert f"{path}:{line}" in msg and problem in msg and (rid is None or f"id={rid!r}" in msg)
    assert f"field {field!r}" in msg
    dm = setup_dm(path, processor, skip_invalid=True, **kw)
    assert [r.id for r in dm.datasets["test"].records] == ["ok1", "ok2"]
    assert dict(dm.reports[str(path)].skipped) == {reason: 1} and dm.skipped == {reason: 1}
    assert dm.reports[str(path)].read == 2 and f"{path}:{line}" in dm.reports[str(path)].errors[0]
    return dm


def test_malformed_json_line(root, tiny_processor):
    path = write(root, [rec("ok1"), '{"id": "x", "image": "images/retina.png", "conversations": [', rec("ok2")])
    expect(path, tiny_processor, 2, None, "<line>", "malformed JSON", "field <line>: malformed JSON")


def test_missing_field(root, tiny_processor):
    bad = rec("b")
    del bad["rejected_conversations"]
    path = write(root, [rec("ok1"), bad, rec("ok2")])
    expect(path, tiny_processor, 2, "b", "rejected_conversations", "missing", "field rejected_conversations: missing")


def test_empty_response(root, tiny_processor):
    path = write(root, [rec("ok1"), rec("ok2"), rec("b", rejected="  ")])
    expect(path, tiny_processor, 3, "b", "rejected_conversations", "the response (last gpt turn) is empty",
           "field rejected_conversations: the response (last gpt turn) is empty")


def test_chosen_identical_to_rejected(root, tiny_processor):
    path = write(root, [rec("b", rejected="The nodule is in the left lung. "), rec("ok1"), rec("ok2")])
    expect(path, tiny_processor, 1, "b", "rejected_conversations", "the rejected response equals the chosen one",
           "field rejected_conversations: the rejected response equals the chosen one")


def test_image_missing(root, tiny_processor):
    path = write(root, [rec("ok1"), rec("b", image="images/gone.png"), rec("ok2")])
    expect(path, tiny_processor, 2, "b", "image", "gone.png", "field image: image file not found")


def test_image_unreadable(root, tiny_processor):
    (root / "images" / "notes.png").write_text("this is not an image\n")
    path = write(root, [rec("ok1"), rec("ok2"), rec("b", image="images/notes.png")])
    expect(path, tiny_processor, 3, "b", "image", "cannot decode image", "field image: image cannot be decoded")


def test_truncated_png_fails_in_setup(root, tiny_processor):
    full = (root / "images" / "retina.png").read_bytes()
    (root / "images" / "cut.png").write_bytes(full[: len(full) // 2])  # header intact, data cut
    # the rejected image is truncated: found in setup (not at the first batch), naming record and field
    data = [rec("ok1"), rec("b", rejected_image="images/cut.png"), rec("ok2")]
    path = write(root, data)
    dm = expect(path, tiny_processor, 2, "b", "rejected_image", "cut.png", "field rejected_image: image cannot be decoded")
    assert len(list(dm.test_dataloader())) == 1
    path = write(root, [rec("ok1"), rec("b", image="images/cut.png"), rec("ok2")], "main.jsonl")
    expect(path, tiny_processor, 2, "b", "image", "image file is truncated", "field image: image cannot be decoded")


@pytest.mark.parametrize("bad", ["/etc/hosts", "../retina.png", "images/../../retina.png"])
def test_image_path_escaping_root(root, tiny_processor, bad):
    path = write(root, [rec("ok1"), rec("ok2"), rec("b", image=bad)])
    expect(path, tiny_processor, 3, "b", "image", "escapes the image root", "field image: image path escapes the image root")


def test_grayscale_16bit_and_rgba_are_converted(root, tiny_processor):
    ct = pydicom.dcmread(os.path.join(os.path.dirname(pydicom.data.__file__), "test_files", "CT_small.dcm"))
    arr = ct.pixel_array.astype(np.uint16)
    assert arr.max() > 255
    Image.fromarray(arr).save(root / "images" / "ct16.png")  # mode I;16
    Image.fromarray(skdata.retina()[::16, ::16]).convert("L").save(root / "images" / "gray.png")
    rgb = skdata.retina()[::16, ::16]
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, :20] = 0
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(root / "images" / "rgba.png")
    for name, mode in [("ct16.png", ("I;16", "I")), ("gray.png", ("L",)), ("rgba.png", ("RGBA",))]:
        assert Image.open(root / "images" / name).mode in mode
    path = write(root, [rec("ct", image="images/ct16.png"), rec("gray", image="images/gray.png"),
                        rec("rgba", image="images/rgba.png", rejected_image="images/ct16.png")])
    dm = setup_dm(path, tiny_processor, corruption="crop")
    ds = dm.datasets["test"]
    assert len(ds) == 3 and not dm.skipped
    from lightning_meddpo.data.datamodule import load_record_image

    ct_img = np.asarray(load_record_image(ds.records[0]))
    assert ct_img.shape == (*arr.shape, 3) and ct_img.max() == 255 and len(np.unique(ct_img)) > 50  # scaled, not clipped
    assert (np.asarray(load_record_image(ds.records[2]))[:, :20] == 0).all()  # transparent -> black
    batch = next(iter(dm.test_dataloader()))
    assert torch_finite(batch.images.pixel_values) and batch.rejected_images is not None


def torch_finite(t) -> bool:
    return bool(t.isfinite().all())


def test_image_over_max_pixels(root, tiny_processor):
    Image.fromarray(np.tile(skdata.retina()[::8, ::8], (2, 2, 1))).save(root / "images" / "big.png")  # 354x354
    path = write(root, [rec("ok1"), rec("b", image="images/big.png"), rec("ok2")])
    expect(path, tiny_processor, 2, "b", "image", "354x354 = 125316 pixels, more than max_pixels=100000",
           "field image: image larger than max_pixels", max_pixels=100_000)
    assert len(setup_dm(path, tiny_processor, max_pixels=None).datasets["test"]) == 3


@pytest.mark.parametrize("literal", ['"NaN"', "NaN", "Infinity", "-Infinity", "true"])
def test_weighted_score_not_finite(root, tiny_processor, literal):
    bad = json.dumps(rec("b", weighted_score=0.5)).replace("0.5", literal)
    path = write(root, [rec("ok1", weighted_score=0.2), bad, rec("ok2", weighted_score=0.9)])
    expect(path, tiny_processor, 2, "b", "weighted_score", "expected a finite number",
           "field weighted_score: expected a finite number")


def test_image_tokens_exceed_max_length(root, tiny_processor, caplog):
    long_q = "<image>\n" + "Describe every finding in great detail please. " * 20
    path = write(root, [rec("ok1"), rec("b", question=long_q), rec("ok2")])
    with pytest.raises(PromptTooLongError) as e:
        setup_dm(path, tiny_processor, max_length=64)
    assert f"{path}:2" in str(e.value) and "id='b'" in str(e.value) and "max_length=64" in str(e.value)
    with caplog.at_level("WARNING"):
        dm = setup_dm(path, tiny_processor, max_length=64, skip_invalid=True)
    assert [r.id for r in dm.datasets["test"].records] == ["ok1", "ok2"]
    assert dm.skipped == {"prompt with image tokens exceeds max_length": 1}
    assert "1 records skipped in validation: 1 prompt with image tokens exceeds max_length" in caplog.text
    # the image tokens alone (4) exceed max_length: every record is refused, and the error says so
    assert image_token_count(tiny_processor) > 3
    with pytest.raises(PromptTooLongError, match=r"id='ok1'.*max_length=3"):
        setup_dm(path, tiny_processor, max_length=3)
    with pytest.raises(ValueError, match="no usable records left .*3 skipped: prompt with image tokens"):
        setup_dm(path, tiny_processor, max_length=3, skip_invalid=True)


def test_skips_are_logged_by_reason(root, tiny_processor, caplog):
    path = write(root, [rec("ok1"), rec("m", image="images/gone.png"), "{", rec("ok2"),
                        rec("s", weighted_score="high")])
    with caplog.at_level("INFO"):
        dm = setup_dm(path, tiny_processor, skip_invalid=True)
    assert dm.skipped == {"field image: image file not found": 1, "field <line>: malformed JSON": 1,
                          "field weighted_score: expected a finite number": 1}
    assert "2 records read; 1 skipped: field <line>: malformed JSON; 1 skipped: field image" in caplog.text
    assert "skipped" in caplog.text and "id='s'" in caplog.text


def test_image_linked_out_of_the_root(root, tiny_processor, tmp_path_factory):
    """A symbolic link inside the image root pointing elsewhere is an escape too."""
    outside = tmp_path_factory.mktemp("outside") / "secret.png"
    Image.fromarray(skdata.retina()[::16, ::16]).save(outside)
    (root / "images" / "link.png").symlink_to(outside)
    path = write(root, [rec("ok1"), rec("ok2"), rec("b", image="images/link.png")])
    expect(path, tiny_processor, 3, "b", "image", "outside the image root", "field image: image path escapes the image root")


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (PIL refuses it before decoding: a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_and_skippable(root, tiny_processor):
    (root / "images" / "bomb.png").write_bytes(png_claiming(40_000, 40_000))
    path = write(root, [rec("ok1"), rec("b", image="images/bomb.png"), rec("ok2")])
    expect(path, tiny_processor, 2, "b", "image", "bomb.png", "field image: image larger than max_pixels")


def test_dicom_is_named(root, tiny_processor):
    import shutil

    shutil.copy(os.path.join(os.path.dirname(pydicom.data.__file__), "test_files", "CT_small.dcm"), root / "images" / "ct.dcm")
    path = write(root, [rec("ok1"), rec("ok2"), rec("b", image="images/ct.dcm")])
    expect(path, tiny_processor, 3, "b", "image", "DICOM is not supported; convert it to PNG", "field image: DICOM file")


def test_non_utf8_and_bom_files(root, tiny_processor):
    good = [rec("ok1"), rec("ok2", chosen="The nodule is in the left lung (café).")]
    bom = root / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in good).encode("utf-8"))
    assert [r.id for r in setup_dm(bom, tiny_processor).datasets["test"].records] == ["ok1", "ok2"]
    latin = root / "latin1.jsonl"
    latin.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in good).encode("latin-1"))
    with pytest.raises(RecordError, match=r"latin1.jsonl:2.*not UTF-8 text: byte 0xe9"):
        setup_dm(latin, tiny_processor)
