"""What a training run trained on, as a record a checkpoint keeps and a resume compares; what a pair IS.

A checkpoint is only the continuation of a run if the data is the same: `--ckpt_path last` after pointing the
config at another training file would otherwise resume at the old run's step on the new data, without a word.
The record has two parts:

- `files`: each training data file's resolved path, size and SHA-256 of its bytes (a `datasets` directory: every
  file's name, size and modification time; hashing gigabytes of arrow shards on every start would cost more
  than the check is worth). SHA-256 runs at about 1 GB/s here (benchmarks/content_keys.py).
- `settings`: the DataModule settings that decide which pairs a step sees and how they are tokenised (the
  checkpoint keeps them as Lightning's `datamodule_hyper_parameters`).

And `record_key`: what one pair is (its text and its images' bytes), the key of the precomputed reference.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lightning_meddpo.reference_cache import file_digest

# DataModule settings that do not change what a training step sees: never a reason to refuse a resume.
NOT_TRAINING = frozenset({"test_file", "eval_batch_size", "num_workers", "demo", "processor", "_instantiator"})
FILE_SETTINGS = ("train_file", "val_file")


def file_identity(path: str | Path | None) -> dict[str, Any] | None:
    """{path, size, sha256} of a data file; a directory's files by (name, size, mtime); a missing path as such."""
    if path is None:
        return None
    p = Path(path).expanduser().resolve()
    if p.is_file():
        return {"path": str(p), "size": p.stat().st_size, "sha256": file_digest(p)}
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return {"path": str(p), "files": [[str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]}
    return {"path": str(p), "missing": True}


def data_files(settings: dict[str, Any]) -> dict[str, Any]:
    """The identity of every training data file the DataModule settings name (train_file, val_file)."""
    return {key: file_identity(settings.get(key)) for key in FILE_SETTINGS}


def _describe(identity: dict[str, Any] | None) -> str:
    if identity is None:
        return "none"
    if identity.get("missing"):
        return f"{identity['path']} (missing)"
    if "sha256" in identity:
        return f"{identity['path']} ({identity['size']} bytes, sha256 {identity['sha256'][:12]})"
    return f"{identity['path']} ({len(identity['files'])} files)"


def data_differences(saved_settings: dict[str, Any] | None, saved_files: dict[str, Any] | None,
                     settings: dict[str, Any]) -> list[str]:
    """`what: checkpoint's -> now` for each training data file whose path or bytes differ, and each training
    setting (see NOT_TRAINING) that differs. A checkpoint written before this record (no `saved_files`) has
    nothing to compare files with: only its settings are compared."""
    out = []
    if saved_files:
        current = data_files(settings)
        for key in FILE_SETTINGS:
            before, now = saved_files.get(key), current[key]
            if before != now:
                same_path = before and now and before["path"] == now["path"]
                out.append(f"{key}: {_describe(before)} -> {_describe(now)}"
                           + (" (the file's content changed)" if same_path else ""))
    for key in sorted(set(saved_settings or {}) & set(settings)):
        if key in NOT_TRAINING or key in FILE_SETTINGS:
            continue
        if saved_settings[key] != settings[key]:
            out.append(f"data.{key}: {saved_settings[key]!r} -> {settings[key]!r}")
    return out


def image_digest(image: Any, digests: dict[str, str]) -> str | None:
    """SHA-256 of an image's bytes: a file's (streamed, each path once through `digests`), or a decoded image's
    pixels, mode and size (from a `datasets` dataset); None for no image."""
    if image is None:
        return None
    if isinstance(image, (str, Path)):
        key = str(image)
        if key not in digests:
            digests[key] = file_digest(image)
        return digests[key]
    return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()


def record_key(record: Any, digests: dict[str, str]) -> str:
    """What a pair's log-probs depend on in the data: its text (every prompt turn, both responses) and the bytes of
    its images (m and m'), never its id, which two files may share, nor a file's size or time, which a replaced
    image may keep. The processor, template and truncation settings are in the cache file's own fingerprint."""
    content = {
        "prompt": [[t.role, t.text] for t in record.prompt],
        "chosen": record.chosen,
        "rejected": record.rejected,
        "pair_type": record.pair_type,
        "image": image_digest(record.image, digests),
        "rejected_image": image_digest(record.rejected_image, digests),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:32]
