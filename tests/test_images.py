"""Image loading on real medical files, and the seeded corruptions (determinism, bounds, provenance)."""

from __future__ import annotations

import json
import os

import numpy as np
import pydicom
import pydicom.data
import pytest
from PIL import Image
from skimage import data as skdata

from lightning_meddpo.data.images import (
    CORRUPTIONS,
    corrupt,
    linear_alpha_bar,
    load_image,
    normalize_spec,
    reproduce,
    seed_for,
)

DICOM_DIR = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files")


def _dicom(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(os.path.join(DICOM_DIR, name))  # bundled files only: no download


def _save16(arr: np.ndarray, path) -> None:
    Image.fromarray(arr.astype(np.uint16)).save(path)  # uint16 array -> mode I;16 PNG


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_16bit_png_from_dicom_scaled_by_max(tmp_path, name):
    arr = _dicom(name).pixel_array.astype(np.int64)
    assert arr.min() >= 0 and arr.max() > 255  # real 12-bit data: clipping would saturate
    path = tmp_path / "slice.png"
    _save16(arr, path)
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I")
    rgb = load_image(path)
    assert rgb.mode == "RGB" and rgb.size == (arr.shape[1], arr.shape[0])
    g = np.asarray(rgb)[..., 0].astype(np.int64)
    assert g.max() == 255  # the actual max maps to white
    expected = np.rint(arr / arr.max() * 255)
    assert np.abs(g - expected).max() <= 1
    assert len(np.unique(g)) > 50  # not saturated


def test_mode_I_with_negative_values(tmp_path):
    arr = _dicom("CT_small.dcm").pixel_array.astype(np.int32) - 1024  # Hounsfield-like, signed
    path = tmp_path / "signed.tif"
    Image.fromarray(arr, "I").save(path)
    g = np.asarray(load_image(path))[..., 0]
    assert g.min() == 0 and g.max() == 255


def test_ultrasound_palette_and_rgb(tmp_path):
    ds = _dicom("examples_palette.dcm")  # an ultrasound frame stored as PALETTE COLOR
    assert ds.Modality == "US"
    idx = ds.pixel_array
    idx = idx[0] if idx.ndim == 3 else idx
    lut = pydicom.pixels.apply_color_lut(np.arange(256, dtype=np.uint8), ds)
    lut8 = (lut.astype(np.float64) / lut.max() * 255).astype(np.uint8) if lut.max() > 255 else lut.astype(np.uint8)
    pim = Image.fromarray(idx.astype(np.uint8), "P")
    pim.putpalette(lut8.reshape(-1).tolist())
    p = tmp_path / "us_palette.png"
    pim.save(p)
    with Image.open(p) as im:
        assert im.mode == "P"
    rgb = load_image(p)
    assert rgb.mode == "RGB" and rgb.size == pim.size
    assert np.array_equal(np.asarray(rgb), np.asarray(pim.convert("RGB")))
    # the colour ultrasound too
    col = _dicom("examples_rgb_color.dcm").pixel_array
    col = col[0] if col.ndim == 4 else col
    q = tmp_path / "us_rgb.png"
    Image.fromarray(col).save(q)
    assert np.array_equal(np.asarray(load_image(q)), col)


def test_grayscale_retina_and_rgba_pathology(tmp_path):
    retina = skdata.retina()[::8, ::8]  # keep it fast
    gpath = tmp_path / "retina_gray.png"
    Image.fromarray(retina).convert("L").save(gpath)
    g = load_image(gpath)
    assert g.mode == "RGB" and np.array_equal(np.asarray(g)[..., 0], np.asarray(g)[..., 2])

    ihc = skdata.immunohistochemistry()[::4, ::4]
    alpha = np.full(ihc.shape[:2], 255, np.uint8)
    alpha[:, : ihc.shape[1] // 2] = 0  # left half fully transparent
    rgba = np.dstack([ihc, alpha])
    apath = tmp_path / "ihc_rgba.png"
    Image.fromarray(rgba, "RGBA").save(apath)
    black = np.asarray(load_image(apath))
    white = np.asarray(load_image(apath, background="white"))
    half = ihc.shape[1] // 2
    assert (black[:, :half] == 0).all() and (white[:, :half] == 255).all()
    assert np.array_equal(black[:, half:], ihc[:, half:])


def test_truncated_png_names_path(tmp_path):
    src = tmp_path / "full.png"
    Image.fromarray(skdata.immunohistochemistry()[::4, ::4]).save(src)
    bad = tmp_path / "truncated.png"
    bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.png") as e:
        load_image(bad, record_id="r1")
    assert "r1" in str(e.value)


def test_refuses_too_large(tmp_path):
    p = tmp_path / "big.png"
    Image.new("L", (300, 200)).save(p)
    with pytest.raises(ValueError, match=r"big.png.*max_pixels=50000"):
        load_image(p, max_pixels=50_000)
    assert load_image(p, max_pixels=60_000).size == (300, 200)


# ------------------------------------------------------------------------------------------- corruptions


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray(skdata.retina()[::16, ::16])  # 89x89 real fundus photo


STOCHASTIC = ["crop", {"type": "diffusion", "t": 500}, "region_noise", "rotate"]


@pytest.mark.parametrize("spec", STOCHASTIC + ["black"])
def test_deterministic_per_seed_and_provenance_roundtrip(image, spec):
    a, pa = corrupt(image, spec, seed=3)
    b, pb = corrupt(image, spec, seed=3)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and pa == pb
    assert a.size == image.size and a.mode == "RGB"
    prov = json.loads(json.dumps(pa))  # provenance is JSON
    assert prov["seed"] == 3 and prov["type"] == normalize_spec(spec)["type"]
    assert np.array_equal(np.asarray(reproduce(image, prov)), np.asarray(a))
    assert not np.array_equal(np.asarray(a), np.asarray(image))


@pytest.mark.parametrize("spec", STOCHASTIC)
def test_differs_across_seeds(image, spec):
    a, _ = corrupt(image, spec, seed=1)
    b, _ = corrupt(image, spec, seed=2)
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_crop_area_bounds(image):
    for seed in range(50):
        _, p = corrupt(image, "crop", seed)
        x0, y0, x1, y1 = p["resolved"]["box"]
        frac = (x1 - x0) * (y1 - y0) / (image.width * image.height)
        assert 0.01 <= frac <= 0.20 and frac == pytest.approx(p["resolved"]["area_fraction"])
        assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height


def test_region_noise_only_inside_region(image):
    arr = np.asarray(image)
    box = (10, 20, 40, 50)
    out, p = corrupt(image, {"type": "region_noise", "box": box}, seed=0)
    o = np.asarray(out)
    inside = np.zeros(arr.shape[:2], bool)
    inside[20:50, 10:40] = True
    assert np.array_equal(o[~inside], arr[~inside])
    assert (o[inside] != arr[inside]).mean() > 0.5
    assert p["resolved"]["region"] == "box" and p["resolved"]["bbox"] == list(box)

    mask = np.zeros(arr.shape[:2], bool)
    mask[5:15, 60:80] = True
    out, p = corrupt(image, {"type": "region_noise", "mask": mask}, seed=0)
    o = np.asarray(out)
    assert np.array_equal(o[~mask], arr[~mask]) and (o[mask] != arr[mask]).any()
    assert p["resolved"]["pixels"] == mask.sum() and p["spec"]["mask"]["pixels"] == mask.sum()

    out, p = corrupt(image, "region_noise", seed=0)  # fallback: centred half-size box
    W, H = image.size
    assert p["resolved"]["region"] == "fallback_centre_half"
    assert p["resolved"]["bbox"] == [W // 4, H // 4, W // 4 + W // 2, H // 4 + H // 2]


def test_diffusion_schedule_extremes(image):
    assert linear_alpha_bar(0) == 1.0
    assert linear_alpha_bar(1) == pytest.approx(1 - 1e-4)
    assert 0.07 < linear_alpha_bar(500) < 0.09  # the standard linear schedule at t=500
    assert linear_alpha_bar(1000) < 1e-4
    arr = np.asarray(image).astype(float)
    same, _ = corrupt(image, {"type": "diffusion", "t": 0}, seed=0)
    assert np.array_equal(np.asarray(same), np.asarray(image))
    near, _ = corrupt(image, {"type": "diffusion", "t": 1}, seed=0)
    assert np.abs(np.asarray(near).astype(float) - arr).mean() < 2.0
    noisy, _ = corrupt(image, {"type": "diffusion", "t": 1000}, seed=0)
    n = np.asarray(noisy).astype(float)
    corr = np.corrcoef(n.ravel(), arr.ravel())[0, 1]
    assert abs(corr) < 0.05  # mostly noise: unrelated to the image
    assert n.std() > 80  # saturated N(0,1) noise in [-1, 1]


def test_spec_errors_and_registry(image):
    assert {"crop", "diffusion", "region_noise", "black", "rotate"} <= set(CORRUPTIONS)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(image, "blur", 0)
    with pytest.raises(ValueError, match="unknown parameter"):
        corrupt(image, {"type": "crop", "area": 0.1}, 0)
    with pytest.raises(ValueError, match="box"):
        corrupt(image, {"type": "region_noise", "box": [500, 500, 600, 600]}, 0)


def test_seed_for_stable():
    s = seed_for("rec-1", 2, 42)
    assert s == seed_for("rec-1", 2, 42) and 0 <= s < 2**63
    assert len({seed_for("rec-1", e, 42) for e in range(5)}) == 5
    assert seed_for("rec-1", 0, 42) != seed_for("rec-2", 0, 42) != seed_for("rec-1", 0, 43)
    assert seed_for("rec-1", 0, 0) == 8867738983419748801  # pinned: SHA-256 never changes across processes


def test_reproduce_with_array_mask(image):
    mask = np.zeros((image.height, image.width), bool)
    mask[30:60, 30:60] = True
    out, prov = corrupt(image, {"type": "region_noise", "mask": mask, "std": 0.3}, seed=9)
    prov = json.loads(json.dumps(prov))
    with pytest.raises(ValueError, match="pass the mask"):
        reproduce(image, prov)
    with pytest.raises(ValueError, match="does not match"):
        reproduce(image, prov, mask=~mask)
    assert np.array_equal(np.asarray(reproduce(image, prov, mask=mask)), np.asarray(out))
