"""A small, visually grounded, medical-style preference dataset for the demo and the tests.

Why: the demo and the test suite need preference data that runs offline in seconds and where a
model can only be right by *looking at the image*: every answer (lesion present, lesion side,
modality, organ) is decided by what is drawn, so a preference formulation that ignores the image cannot
beat chance, and image-side terms (CoPO, mDPO, MMedPO, the targeted mix) have a meaningful
corrupted image to contrast with.

Files are written in the paper's released format (docs/design.md section 5), plus a LLaVA-Med style
question file for held-out VQA evaluation:

    out_dir/images/{split}_{i:05d}.png           the image
    out_dir/images/{split}_{i:05d}_corrupt.png   the rejected image (contradicts the chosen answer)
    out_dir/train.json, val.json, test.json      JSON arrays of preference records
    out_dir/vqa_test.jsonl                       the test split as benchmark questions, with their ground truth
    out_dir/.synthetic_dataset.json              marker: written first as "building", completed last

The generator writes only into a folder that is absent, empty, or already carries the marker: a folder
of the user's own files is never touched (`DemoFolderError`), whatever a config points at.

Image conventions: "left"/"right" mean the left/right half of the image as displayed (not the
radiological patient side). A lesion is a disc of pure white (255 in every channel); everything else
is drawn at or below BACKGROUND_MAX, so the lesion can be found by thresholding the decoded PNG.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

FORMAT_VERSION = 3  # 3: vqa_test.jsonl carries each question's ground truth
MARKER_NAME = ".synthetic_dataset.json"
SPLITS = ("train", "val", "test")
MODALITIES = ("CT", "MRI", "X-ray", "ultrasound")
ORGANS = ("lung", "brain", "liver")
SIDES = ("left", "right")
LESION_VALUE = 255
BACKGROUND_MAX = 200
LESION_PROB = 0.6

# Question kinds, their question text, and the benchmark answer type (CLOSED = yes/no).
QUESTIONS = {
    "presence": "Is there a lesion in this image?",
    "side": "Which side is the lesion on?",
    "modality": "What is the imaging modality?",
    "organ": "Which organ is shown in this image?",
}
ANSWER_TYPE = {"presence": "CLOSED", "side": "OPEN", "modality": "OPEN", "organ": "OPEN"}

# Clinical-relevance weight per error type (MMedPO's weighted_score): missing or misplacing a lesion
# matters more than naming the wrong modality. Each record's score is this minus a small jitter.
ERROR_WEIGHT = {
    "missed_lesion": 1.0,
    "laterality": 0.9,
    "invented_lesion": 0.8,
    "wrong_organ": 0.6,
    "wrong_modality": 0.5,
}


# ---------------------------------------------------------------------------------------------
# Text templates (small, fixed vocabulary: the demo tokenizer is trained on demo_corpus()).


def _modality_sentence(modality: str) -> str:
    return {
        "CT": "This is a CT scan.",
        "MRI": "This is an MRI scan.",
        "X-ray": "This is an X-ray image.",
        "ultrasound": "This is an ultrasound image.",
    }[modality]


def _organ_sentence(organ: str) -> str:
    return f"The image shows the {organ}."


def _presence_sentence(lesion: str | None, organ: str) -> str:
    if lesion is None:
        return "No, there is no lesion in this image."
    return f"Yes, there is a lesion in the {lesion} side of the {organ}."


def _side_sentence(side: str) -> str:
    return f"The lesion is on the {side} side."


def demo_corpus() -> list[str]:
    """Every question and answer sentence the generator can write (chosen and rejected alike).

    Why: the tiny demo tokenizer is trained on this list, so every record text tokenises into known
    words. The `<image>` placeholder is not included; the tokenizer adds it as a special token.
    """
    out: list[str] = list(QUESTIONS.values())
    out += [_modality_sentence(m) for m in MODALITIES]
    out += [_organ_sentence(o) for o in ORGANS]
    out.append(_presence_sentence(None, ORGANS[0]))
    out += [_presence_sentence(s, o) for o in ORGANS for s in SIDES]
    out += [_side_sentence(s) for s in SIDES]
    return out


# ---------------------------------------------------------------------------------------------
# Images.


@dataclass(frozen=True)
class ImageSpec:
    """Everything that decides an image's pixels. Content factors plus nuisance jitter and a noise seed."""

    modality: str
    organ: str
    lesion: str | None  # None, "left" or "right"
    size: int
    lesion_dx: float  # lesion centre offset from the side's centre, fraction of size
    lesion_dy: float
    body_dx: float  # body centre jitter, fraction of size
    body_dy: float
    body_scale: float
    gain: float
    noise_seed: int


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def lesion_center(spec: ImageSpec) -> tuple[float, float]:
    """Pixel centre (x, y) of the lesion: in the middle of its image half, give or take the jitter."""
    s = spec.size
    base_x = 0.28 if spec.lesion == "left" else 0.72
    return (base_x + spec.lesion_dx) * s, (0.5 + spec.lesion_dy) * s


def render_image(spec: ImageSpec) -> np.ndarray:
    """Draw the image as an (H, W, 3) uint8 array: modality look, organ cue, noise, then the lesion."""
    s = spec.size
    rng = np.random.default_rng(spec.noise_seed)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    cx, cy = (0.5 + spec.body_dx) * s, (0.5 + spec.body_dy) * s
    rx, ry = 0.44 * s * spec.body_scale, 0.40 * s * spec.body_scale
    body = _ellipse(xx, yy, cx, cy, rx, ry)
    img = np.zeros((s, s), np.float32)

    if spec.modality == "CT":  # smooth grey body, bright bony rim, black outside
        img[body] = 100.0
        img[body & ~_ellipse(xx, yy, cx, cy, rx - max(1.5, 0.06 * s), ry - max(1.5, 0.06 * s))] = 185.0
    elif spec.modality == "MRI":  # brighter body with strong vertical stripe texture, no bony rim
        stripes = 150.0 + 40.0 * np.sign(np.sin(2 * np.pi * xx / max(4.0, s / 8)))
        img[body] = stripes[body]
    elif spec.modality == "X-ray":  # grey everywhere, bright horizontal ribs and a vertical spine
        img[:] = 45.0
        img[body] = 80.0
        period = max(4.0, s / 6)
        ribs = (np.mod(yy, period) < period / 3) & body
        img[ribs] = 190.0
        img[body & (np.abs(xx - cx) < max(1.0, 0.05 * s))] = 195.0
    elif spec.modality == "ultrasound":  # speckled fan-shaped sector from the top centre
        apex_x, apex_y = s / 2, -0.05 * s
        ang = np.arctan2(xx - apex_x, yy - apex_y)
        rad = np.hypot(xx - apex_x, yy - apex_y)
        body = (np.abs(ang) < np.deg2rad(48)) & (rad < 1.02 * s)
        speckle = rng.gamma(2.0, 45.0, size=(s, s)).astype(np.float32)
        img[body] = np.clip(speckle[body], 20.0, 190.0)
    else:
        raise ValueError(f"unknown modality {spec.modality!r}; expected one of {MODALITIES}")

    if spec.organ == "lung":  # two dark vertical lobes
        for sx in (-1, 1):
            img[_ellipse(xx, yy, cx + sx * 0.2 * s, cy, 0.11 * s, 0.24 * s) & body] = 15.0
    elif spec.organ == "brain":  # one dark ring with a dark midline
        r_out, r_in = 0.30 * s, 0.30 * s - max(2.0, 0.07 * s)
        ring = _ellipse(xx, yy, cx, cy, r_out, r_out) & ~_ellipse(xx, yy, cx, cy, r_in, r_in)
        img[ring & body] = 15.0
        img[(np.abs(xx - cx) < max(0.75, 0.03 * s)) & _ellipse(xx, yy, cx, cy, r_in, r_in) & body] = 15.0
    elif spec.organ == "liver":  # one wide bright mass in the upper half
        img[_ellipse(xx, yy, cx, cy - 0.12 * s, 0.30 * s, 0.13 * s) & body] = 200.0
    else:
        raise ValueError(f"unknown organ {spec.organ!r}; expected one of {ORGANS}")

    img = img * spec.gain + rng.normal(0.0, 6.0, size=(s, s)).astype(np.float32)
    img = np.clip(np.rint(img), 0, BACKGROUND_MAX)
    if spec.lesion is not None:
        lx, ly = lesion_center(spec)
        r = max(2.0, s / 8)
        img[_ellipse(xx, yy, lx, ly, r, r)] = LESION_VALUE
    return np.repeat(img.astype(np.uint8)[:, :, None], 3, axis=2)


def _random_spec(rng: np.random.Generator, size: int) -> ImageSpec:
    lesion = str(rng.choice(SIDES)) if rng.random() < LESION_PROB else None
    return ImageSpec(
        modality=str(rng.choice(MODALITIES)),
        organ=str(rng.choice(ORGANS)),
        lesion=lesion,
        size=size,
        lesion_dx=float(rng.uniform(-0.06, 0.06)),
        lesion_dy=float(rng.uniform(-0.12, 0.12)),
        body_dx=float(rng.uniform(-0.04, 0.04)),
        body_dy=float(rng.uniform(-0.04, 0.04)),
        body_scale=float(rng.uniform(0.93, 1.05)),
        gain=float(rng.uniform(0.9, 1.05)),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


def labelled_images(n: int, image_size: int, seed: int) -> tuple[list[Image.Image], np.ndarray]:
    """`n` freshly drawn demo images (never the ones written to a dataset: another stream) and their labels
    [modality index, organ index, lesion (0 none, 1 left, 2 right)], for warm-starting a vision tower."""
    rng = np.random.default_rng([seed, 99])
    images, labels = [], []
    for _ in range(n):
        spec = _random_spec(rng, image_size)
        images.append(Image.fromarray(render_image(spec), mode="RGB"))
        labels.append([MODALITIES.index(spec.modality), ORGANS.index(spec.organ), (None, *SIDES).index(spec.lesion)])
    return images, np.array(labels)


def _other(rng: np.random.Generator, options: tuple[str, ...], value: str) -> str:
    return str(rng.choice([o for o in options if o != value]))


# ---------------------------------------------------------------------------------------------
# Records.


@dataclass(frozen=True)
class _Example:
    kind: str
    chosen: str
    rejected: str
    error_type: str
    corrupt: ImageSpec  # an image on which the chosen answer is wrong


def _make_example(rng: np.random.Generator, spec: ImageSpec) -> _Example:
    """Pick a question the image can answer, its correct answer, a visual misreading and a contradicting image."""
    kinds = ["presence", "modality", "organ"] + (["side", "side"] if spec.lesion else [])
    kind = str(rng.choice(kinds))
    if kind == "side":
        flipped = _other(rng, SIDES, spec.lesion)
        return _Example(kind, _side_sentence(spec.lesion), _side_sentence(flipped), "laterality",
                        replace(spec, lesion=flipped))
    if kind == "presence":
        chosen = _presence_sentence(spec.lesion, spec.organ)
        if spec.lesion is None:
            side = str(rng.choice(SIDES))
            return _Example(kind, chosen, _presence_sentence(side, spec.organ), "invented_lesion",
                            replace(spec, lesion=side))
        if rng.random() < 0.5:
            return _Example(kind, chosen, _presence_sentence(None, spec.organ), "missed_lesion",
                            replace(spec, lesion=None))
        flipped = _other(rng, SIDES, spec.lesion)
        return _Example(kind, chosen, _presence_sentence(flipped, spec.organ), "laterality",
                        replace(spec, lesion=flipped))
    if kind == "modality":
        wrong = _other(rng, MODALITIES, spec.modality)
        return _Example(kind, _modality_sentence(spec.modality), _modality_sentence(wrong), "wrong_modality",
                        replace(spec, modality=wrong))
    wrong = _other(rng, ORGANS, spec.organ)
    return _Example(kind, _organ_sentence(spec.organ), _organ_sentence(wrong), "wrong_organ",
                    replace(spec, organ=wrong))


def _save_png(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr, mode="RGB").save(path, format="PNG", optimize=False, compress_level=6)


def _build_split(out_dir: Path, split: str, n: int, image_size: int, seed: int,
                 image_pair_fraction: float) -> list[dict[str, Any]]:
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    n_image_pairs = int(round(n * image_pair_fraction))
    image_pair_idx = set(rng.permutation(n)[:n_image_pairs].tolist()) if n_image_pairs else set()
    records = []
    for i in range(n):
        spec = _random_spec(rng, image_size)
        ex = _make_example(rng, spec)
        stem = f"{split}_{i:05d}"
        _save_png(render_image(spec), out_dir / "images" / f"{stem}.png")
        _save_png(render_image(ex.corrupt), out_dir / "images" / f"{stem}_corrupt.png")
        jitter = float(rng.uniform(0.0, 0.1))
        is_image_pair = i in image_pair_idx
        prompt = {"from": "human", "value": f"<image>\n{QUESTIONS[ex.kind]}"}
        rejected = ex.chosen if is_image_pair else ex.rejected
        records.append({
            "id": f"synth-{split}-{i:05d}",
            "image": f"images/{stem}.png",
            "conversations": [prompt, {"from": "gpt", "value": ex.chosen}],
            "rejected_conversations": [dict(prompt), {"from": "gpt", "value": rejected}],
            "rejected_image": f"images/{stem}_corrupt.png",
            "weighted_score": round(ERROR_WEIGHT[ex.error_type] - jitter, 3),
            "error_type": ex.error_type,
            "pair_type": "image" if is_image_pair else "text",
            "question_type": ex.kind,
            "modality": spec.modality,
            "organ": spec.organ,
            "lesion_side": spec.lesion,
        })
    return records


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _params(n_train: int, n_val: int, n_test: int, image_size: int, seed: int,
            image_pair_fraction: float) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "n_train": n_train, "n_val": n_val, "n_test": n_test,
            "image_size": image_size, "seed": seed, "image_pair_fraction": float(image_pair_fraction)}


def _paths(out_dir: Path) -> dict[str, Path]:
    return {
        "root": out_dir,
        "images": out_dir / "images",
        "train": out_dir / "train.json",
        "val": out_dir / "val.json",
        "test": out_dir / "test.json",
        "vqa_test": out_dir / "vqa_test.jsonl",
    }


def benchmark_answer(record: dict[str, Any]) -> str:
    """The short gold answer a VQA benchmark gives (as VQA-RAD / SLAKE do): yes/no for closed
    questions, the grounded word for open ones; full-sentence golds would defeat closed accuracy."""
    kind = record["question_type"]
    if kind == "presence":
        return "yes" if record["lesion_side"] else "no"
    return {"side": record["lesion_side"], "modality": record["modality"], "organ": record["organ"]}[kind]


class DemoFolderError(ValueError):
    """The demo dataset would be written into a folder that holds files that are not the demo's."""


def check_demo_folder(out_dir: Path) -> None:
    """The demo may write into `out_dir` only if it is absent, empty, or marked as a demo folder."""
    if (out_dir / MARKER_NAME).is_file() or not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DemoFolderError(f"{out_dir} is a file, not a folder: the synthetic demo dataset cannot be written there")
    others = sorted(p.name for p in out_dir.iterdir())
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise DemoFolderError(
            f"refusing to write the synthetic demo dataset into {out_dir}: the folder holds files that are not the "
            f"demo's ({shown}) and no {MARKER_NAME} marker. Nothing was written. To train or evaluate on these "
            "files, turn the demo off (--data.init_args.demo=false); to build the demo, point it at a new folder."
        )


def generate_demo_dataset(
    out_dir: str | Path,
    *,
    n_train: int = 256,
    n_val: int = 64,
    n_test: int = 64,
    image_size: int = 32,
    seed: int = 0,
    image_pair_fraction: float = 0.0,
) -> dict[str, Path]:
    """Write the demo dataset under out_dir (always regenerating) and return its paths.

    Returns keys root, images, train, val, test, vqa_test. `out_dir` must be absent, empty or an earlier
    demo build (see `check_demo_folder`). Output is byte-identical for the same arguments; each split
    draws from its own seeded stream, so changing n_train leaves val and test
    unchanged. `image_pair_fraction` of each split become image-rejected pairs (pair_type "image":
    rejected response == chosen response; the rejected_image contradicts it).
    """
    if not 0.0 <= image_pair_fraction <= 1.0:
        raise ValueError(f"image_pair_fraction must be in [0, 1], got {image_pair_fraction}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    out_dir = Path(out_dir)
    check_demo_folder(out_dir)
    paths = _paths(out_dir)
    params = _params(n_train, n_val, n_test, image_size, seed, image_pair_fraction)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / MARKER_NAME
    # Claimed first (an interrupted build is then known to be ours, and is redone), completed last.
    _write_text(marker, json.dumps({**params, "complete": False}, sort_keys=True) + "\n")
    paths["images"].mkdir(exist_ok=True)

    splits = {}
    for split, n in zip(SPLITS, (n_train, n_val, n_test)):
        splits[split] = _build_split(out_dir, split, n, image_size, seed, image_pair_fraction)
        _write_text(paths[split], json.dumps(splits[split], indent=1) + "\n")
    vqa = []
    for rec in splits["test"]:
        question = rec["conversations"][0]["value"].replace("<image>", "").strip()
        vqa.append(json.dumps({
            "question_id": rec["id"],
            "image": rec["image"],
            "text": question,
            "answer": benchmark_answer(rec),
            "answer_type": ANSWER_TYPE[rec["question_type"]],
            # the ground truth the error analysis reads (eval/errors.py); benchmark files have none
            "question_type": rec["question_type"], "modality": rec["modality"], "organ": rec["organ"],
            "lesion_side": rec["lesion_side"],
        }))
    _write_text(paths["vqa_test"], "".join(line + "\n" for line in vqa))
    _write_text(marker, json.dumps({**params, "complete": True}, sort_keys=True) + "\n")
    return paths


def ensure_demo_dataset(out_dir: str | Path, **kwargs: Any) -> dict[str, Path]:
    """Generate the demo dataset unless out_dir already holds a complete build with these parameters.

    Why: the demo config and many tests share one dataset directory; rebuilding it each time is
    wasted work. The marker is completed last and atomically, so an interrupted build is redone. A folder
    of other files is refused (`DemoFolderError`) before anything is written.
    """
    out_dir = Path(out_dir)
    defaults = {"n_train": 256, "n_val": 64, "n_test": 64, "image_size": 32, "seed": 0,
                "image_pair_fraction": 0.0}
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"ensure_demo_dataset got unknown arguments {sorted(unknown)}; "
                        f"expected some of {sorted(defaults)}")
    args = {**defaults, **kwargs}
    paths = _paths(out_dir)
    marker = out_dir / MARKER_NAME
    try:
        done = json.loads(marker.read_text(encoding="utf-8")) == {**_params(**args), "complete": True}
    except (OSError, ValueError):
        done = False
    if done and all(p.exists() for p in paths.values()):
        return paths
    return generate_demo_dataset(out_dir, **args)


def demo_for_files(files: list[str | None], **options: Any) -> dict[str, Path]:
    """Build (or reuse) the demo dataset that the data files of a config name, e.g. a DataModule's
    train/val/test files with `demo` on. They must be the demo's own files in one folder: a config that
    points the demo at anything else (the user's data, say) is an error, never a write."""
    named = [Path(f) for f in files if f]
    if not named:
        raise DemoFolderError("demo is on but no data file is set: set train_file (or test_file) to e.g. data/demo/train.json")
    folder = named[0].parent
    own = {p.name for key, p in _paths(folder).items() if key not in ("root", "images")}
    strangers = [str(f) for f in named if f.parent != folder or f.name not in own]
    if strangers:
        raise DemoFolderError(
            f"demo is on, but {strangers} are not files of the synthetic demo dataset in {folder} "
            f"({sorted(own)}). To use your own data, turn the demo off (--data.init_args.demo=false)."
        )
    return ensure_demo_dataset(folder, **options)
