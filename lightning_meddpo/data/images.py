"""Image loading and seeded image corruptions for image-side preference terms (docs/design.md §4, §5).

Loading: `load_image` decodes any common file (grayscale, 16-bit, RGBA, palette, CMYK, ...) to 8-bit RGB.
16-bit / 32-bit images are scaled by their actual range (max, or min..max when negative values occur),
never clipped; images with an alpha channel are composited on black by default (`background="white"`
to change it); images over `max_pixels` are refused before decoding.

Corruptions: each one is a function `(image, rng, **params) -> (image, resolved)` registered by name.
`corrupt(image, spec, seed)` applies one and returns the corrupted image and a provenance dict

    {"type": "crop", "spec": {"type": "crop", "min_area": 0.01, ...}, "seed": 7,
     "resolved": {"box": [x0, y0, x1, y1], "area_fraction": 0.08}, "size": [w, h]}

`corrupt(image, provenance["spec"], provenance["seed"])` (or `reproduce(image, provenance)`) gives the same
image again. All randomness comes from `numpy.random.default_rng(seed)`, so results do not depend on the
process or on global RNG state. `seed_for(record_id, epoch, base_seed)` derives a per-record seed with
SHA-256, stable across processes and Python versions, for on-the-fly corruption in a DataModule.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 100_000_000  # 10k x 10k; PIL's own bomb check refuses above ~179M regardless

Resolved = dict[str, Any]
CorruptionFn = Callable[..., tuple[Image.Image, Resolved]]


# ----------------------------------------------------------------------------------------------- loading


def _wide_to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float single-channel image -> 8-bit L, scaled by the actual range."""
    arr = np.asarray(im).astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        return Image.fromarray(np.zeros(arr.shape, np.uint8), "L")
    arr = np.where(finite, arr, 0.0)
    lo = min(0.0, float(arr.min()))  # keep zero at zero unless the data go negative (e.g. signed CT)
    hi = float(arr.max())
    if hi <= lo:
        return Image.fromarray(np.zeros(arr.shape, np.uint8), "L")
    out = np.rint((arr - lo) / (hi - lo) * 255.0).clip(0, 255).astype(np.uint8)
    return Image.fromarray(out, "L")


def to_rgb8(im: Image.Image, *, background: str = "black") -> Image.Image:
    """Any PIL image -> 8-bit RGB. Alpha is composited on `background` ("black" or "white")."""
    if background not in ("black", "white"):
        raise ValueError(f"background must be 'black' or 'white', got {background!r}")
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode.startswith("I") or mode == "F":
        return _wide_to_8bit(im).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (0, 0, 0, 255) if background == "black" else (255, 255, 255, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_image(
    path: str | Path,
    *,
    record_id: str | None = None,
    field_name: str = "image",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    background: str = "black",
) -> Image.Image:
    """Decode an image fully and return it as 8-bit RGB; failures name the record and the file.

    Grayscale and palette images are expanded to RGB; 16-bit (I;16, I) and float images are scaled by
    their actual maximum (min..max if negative values occur) rather than clipped; alpha is composited on
    black (or white with background="white"). Images with more than `max_pixels` pixels (None: no limit
    of ours) are refused before decoding.
    """
    rid = f" id={record_id!r}" if record_id else ""
    if is_dicom(path):
        raise ValueError(f"record{rid}: field {field_name!r}: {path} is a DICOM file: DICOM is not supported; "
                         "convert it to PNG (windowed as you want the model to see it)")
    try:
        with Image.open(path) as im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise ValueError(
                    f"record{rid}: field {field_name!r}: image {path} is {w}x{h} = {w * h} pixels, "
                    f"more than max_pixels={max_pixels} (raise max_pixels to allow it)"
                )
            im.load()
            return to_rgb8(im, background=background)
    except Image.DecompressionBombError as e:
        raise ValueError(f"record{rid}: field {field_name!r}: image {path} is too large: {e}") from e
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise ValueError(f"record{rid}: field {field_name!r}: cannot decode image {path}: {e}") from e


def is_dicom(path: str | Path) -> bool:
    """A DICOM Part 10 file: "DICM" after its 128-byte preamble."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------- seeds


def seed_for(record_id: str, epoch: int, base_seed: int) -> int:
    """A 63-bit seed derived from (base_seed, epoch, record_id) with SHA-256: same in every process."""
    digest = hashlib.sha256(f"{int(base_seed)}\x1f{int(epoch)}\x1f{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------------------- registry

CORRUPTIONS: dict[str, CorruptionFn] = {}


def register_corruption(name: str) -> Callable[[CorruptionFn], CorruptionFn]:
    """Register `fn(image, rng, **params) -> (image, resolved)` under `name`."""

    def deco(fn: CorruptionFn) -> CorruptionFn:
        if name in CORRUPTIONS:
            raise ValueError(f"corruption {name!r} is already registered")
        CORRUPTIONS[name] = fn
        return fn

    return deco


def _params_of(fn: CorruptionFn) -> dict[str, Any]:
    sig = inspect.signature(fn)
    return {n: p.default for n, p in list(sig.parameters.items())[2:]}


def normalize_spec(spec: str | dict[str, Any]) -> dict[str, Any]:
    """`"crop"` or `{"type": "crop", ...}` -> a full spec with every default filled in; unknown names raise."""
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"corruption spec must be a name or a dict with 'type', got {spec!r}")
    name = spec["type"]
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {sorted(CORRUPTIONS)}")
    defaults = _params_of(CORRUPTIONS[name])
    unknown = set(spec) - {"type"} - set(defaults)
    if unknown:
        raise ValueError(f"corruption {name!r}: unknown parameter(s) {sorted(unknown)}; known: {sorted(defaults)}")
    return {"type": name, **defaults, **{k: v for k, v in spec.items() if k != "type"}}


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (np.ndarray, Image.Image)):
        return _describe_mask(v)
    if isinstance(v, Path):
        return str(v)
    return v


def corrupt(image: Image.Image, spec: str | dict[str, Any], seed: int) -> tuple[Image.Image, dict[str, Any]]:
    """Apply one registered corruption, seeded. Returns (corrupted RGB image, provenance)."""
    full = normalize_spec(spec)
    rgb = to_rgb8(image)
    rng = np.random.default_rng(int(seed))
    params = {k: v for k, v in full.items() if k != "type"}
    out, resolved = CORRUPTIONS[full["type"]](rgb, rng, **params)
    provenance = {
        "type": full["type"],
        "spec": _jsonable(full),
        "seed": int(seed),
        "resolved": _jsonable(resolved),
        "size": [rgb.width, rgb.height],
    }
    return out, provenance


def reproduce(image: Image.Image, provenance: dict[str, Any], *, mask: Any = None) -> Image.Image:
    """Re-apply a recorded corruption. A region mask that was given as an array is recorded only by its
    shape, pixel count and hash: pass it again as `mask` (it is checked against the recorded hash)."""
    spec = dict(provenance["spec"])
    if isinstance(spec.get("mask"), dict):
        if mask is None:
            raise ValueError("this provenance recorded its region mask only by hash; pass the mask: "
                             "reproduce(image, provenance, mask=mask)")
        if _describe_mask(mask)["sha256"] != spec["mask"]["sha256"]:
            raise ValueError("the mask given does not match the recorded one (sha256 differs)")
        spec["mask"] = mask
    return corrupt(image, spec, provenance["seed"])[0]


# ------------------------------------------------------------------------------------------- corruptions


def _to_float(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.float64) / 127.5 - 1.0  # [-1, 1]


def _from_float(x: np.ndarray) -> Image.Image:
    return Image.fromarray(np.rint((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8), "RGB")


@register_corruption("crop")
def random_resized_crop(
    image: Image.Image,
    rng: np.random.Generator,
    min_area: float = 0.01,
    max_area: float = 0.2,
    min_ratio: float = 3 / 4,
    max_ratio: float = 4 / 3,
) -> tuple[Image.Image, Resolved]:
    """mDPO's corruption: keep a random crop of `min_area`..`max_area` of the area, resize back to full size."""
    if not 0 < min_area <= max_area <= 1:
        raise ValueError(f"crop: need 0 < min_area <= max_area <= 1, got {min_area}, {max_area}")
    W, H = image.size
    total = W * H
    box = None
    for _ in range(20):
        target = rng.uniform(min_area, max_area) * total
        ratio = math.exp(rng.uniform(math.log(min_ratio), math.log(max_ratio)))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 1 <= w <= W and 1 <= h <= H and min_area <= w * h / total <= max_area:
            x0 = int(rng.integers(0, W - w + 1))
            y0 = int(rng.integers(0, H - h + 1))
            box = (x0, y0, x0 + w, y0 + h)
            break
    if box is None:  # very elongated or tiny images: a centred crop scaled per axis
        s = math.sqrt((min_area + max_area) / 2)
        w, h = max(1, int(round(W * s))), max(1, int(round(H * s)))
        box = ((W - w) // 2, (H - h) // 2, (W - w) // 2 + w, (H - h) // 2 + h)
    out = image.crop(box).resize((W, H), Image.Resampling.BICUBIC)
    frac = (box[2] - box[0]) * (box[3] - box[1]) / total
    return out, {"box": list(box), "area_fraction": frac}


def linear_alpha_bar(t: int, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> float:
    """abar_t = prod_{s=1..t} (1 - beta_s), betas linear from beta_start to beta_end over T steps; abar_0 = 1."""
    if not 0 <= t <= T:
        raise ValueError(f"diffusion: need 0 <= t <= T, got t={t}, T={T}")
    betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    return float(np.prod(1.0 - betas[:t]))


@register_corruption("diffusion")
def diffusion_noise(
    image: Image.Image,
    rng: np.random.Generator,
    t: int = 500,
    T: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> tuple[Image.Image, Resolved]:
    """Forward diffusion q(x_t|x_0): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, x0 in [-1, 1] (POVID/CHiP: t=500)."""
    abar = linear_alpha_bar(int(t), int(T), beta_start, beta_end)
    x0 = _to_float(image)
    eps = rng.standard_normal(x0.shape)
    xt = math.sqrt(abar) * x0 + math.sqrt(1.0 - abar) * eps
    return _from_float(xt), {"alpha_bar": abar}


def _describe_mask(mask: Any) -> dict[str, Any]:
    m = np.asarray(mask)
    m = (m.any(axis=-1) if m.ndim == 3 else m).astype(bool)
    return {"shape": list(m.shape), "pixels": int(m.sum()), "sha256": hashlib.sha256(np.packbits(m).tobytes()).hexdigest()}


def _region_mask(size: tuple[int, int], box: Any, mask: Any) -> tuple[np.ndarray, str]:
    W, H = size
    if box is not None and mask is not None:
        raise ValueError("region_noise: give a box or a mask, not both")
    if mask is not None:
        if isinstance(mask, dict):
            raise ValueError("region_noise: the mask is a recorded description, not a mask; pass the mask "
                             "itself (images.reproduce(image, provenance, mask=...))")
        if isinstance(mask, (str, Path)):
            with Image.open(mask) as mim:
                m = np.asarray(mim.convert("L")) > 0
            source = "mask_file"
        else:
            m = np.asarray(mask)
            if m.ndim == 3:
                m = m.any(axis=-1)
            m = m.astype(bool)
            source = "mask"
        if m.shape != (H, W):
            raise ValueError(f"region_noise: mask shape {m.shape} != image (height, width) {(H, W)}")
        if not m.any():
            raise ValueError("region_noise: the mask is empty")
        return m, source
    if box is not None:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(W, x1), min(H, y1)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"region_noise: box {list(box)} is empty inside a {W}x{H} image")
        source = "box"
    else:  # documented fallback: centred box of half the width and half the height
        x0, y0 = W // 4, H // 4
        x1, y1 = x0 + max(1, W // 2), y0 + max(1, H // 2)
        source = "fallback_centre_half"
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m, source


@register_corruption("region_noise")
def region_noise(
    image: Image.Image,
    rng: np.random.Generator,
    box: list[float] | None = None,
    mask: Any = None,
    std: float = 0.5,
) -> tuple[Image.Image, Resolved]:
    """MMedPO-style lesion-region noise: Gaussian noise of `std` (in [-1, 1] units) added only inside a region.

    The region is `box` = (x0, y0, x1, y1) in pixels (x1, y1 exclusive; clipped to the image), or `mask`
    (a boolean HxW array, or a path to a mask image where non-zero = region). With neither, the fallback is
    a centred box of half the width and half the height. Pixels outside the region are left unchanged.
    A mask given as an array is recorded in the provenance only by shape, pixel count and hash.
    """
    m, source = _region_mask(image.size, box, mask)
    x = _to_float(image)
    noise = rng.standard_normal(x.shape) * float(std)
    x = np.where(m[..., None], x + noise, x)
    out = np.asarray(image).copy()
    out[m] = np.asarray(_from_float(x))[m]
    ys, xs = np.nonzero(m)
    bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    return Image.fromarray(out, "RGB"), {"region": source, "bbox": bbox, "pixels": int(m.sum())}


@register_corruption("black")
def black_image(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, Resolved]:
    """An all-black image of the same size (the seed is recorded but unused)."""
    return Image.new("RGB", image.size, (0, 0, 0)), {}


@register_corruption("rotate")
def rotate(
    image: Image.Image,
    rng: np.random.Generator,
    angle: float | None = None,
    min_angle: float = 30.0,
    max_angle: float = 330.0,
) -> tuple[Image.Image, Resolved]:
    """Rotate counter-clockwise about the centre by `angle` degrees, or by a uniform draw in
    [min_angle, max_angle] (default avoids near-identity rotations); same size, corners filled black."""
    a = float(angle) if angle is not None else float(rng.uniform(min_angle, max_angle))
    out = image.rotate(a, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=(0, 0, 0))
    return out, {"angle": a}
