"""Precomputed reference log-probs (`reference: precomputed`): computed once, cached on disk, reused.

The reference model of DPO-style losses is the starting model, frozen. Its log-probs for every view a
loss needs (chosen / rejected on m, and on the corrupted image m') depend only on the pair, the starting
weights and the way pairs are tokenised, so they are computed once before the first step and cached:

- one cache file per starting model and tokenisation, named by a fingerprint of the starting weights (the
  backbone directory's files by name, size and modification time, the JSON files' content; a hub id by name;
  the `init_from` checkpoint's), the processor (chat template, image processor settings, vocabulary size),
  the data settings that change tokenisation or m' (max_length, image placeholder, corruption and its seed),
  the views and the numeric precision;
- in it, one entry per pair's *content key* (data/fingerprint.record_key: the pair's text and the bytes of its
  images), never its id: records of two files that share an id, or a record whose image was replaced by
  another of the same size and time, are different entries. A changed pair misses the cache and only it is
  computed; nothing stale is read.

TRL refuses a precomputed reference for vision data; here it works for every image-side view, except where
m' is drawn anew each epoch (on-the-fly corruption), which has no fixed reference log-prob: refused.
The cache lives in the tool's cache directory (never beside the user's data).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def _stat(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_fingerprint(source: str | Path) -> list[Any]:
    """A directory: every file's (name, size, mtime) and the JSON files' content; a file (a Lightning
    checkpoint): its (path, size, mtime); anything else (a hub id): the name itself."""
    path = Path(source)
    if path.is_dir():
        out: list[Any] = []
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            out.append(_stat(f)[1:] + [str(f.relative_to(path))])
            if f.suffix == ".json" and f.stat().st_size < 1 << 20:
                out.append(hashlib.sha256(f.read_bytes()).hexdigest())
        return out
    if path.is_file():
        return _stat(path)
    return [str(source)]


def processor_fingerprint(processor: Any) -> dict[str, Any]:
    image_processor = getattr(processor, "image_processor", None)
    tokenizer = getattr(processor, "tokenizer", processor)
    return {
        "chat_template": getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None),
        "image_processor": image_processor.to_json_string() if hasattr(image_processor, "to_json_string") else repr(image_processor),
        "vocab": len(tokenizer),
        "class": type(processor).__name__,
    }


def fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class ReferenceTable:
    """Reference log-probs per view and pair content key (see the module docstring)."""

    def __init__(self, views: tuple[str, ...], values: dict[str, dict[str, float]] | None = None):
        self.views = views
        self.values: dict[str, dict[str, float]] = values or {v: {} for v in views}

    def add(self, keys: list[str], logps: dict[str, Tensor]) -> None:
        for view in self.views:
            for key, value in zip(keys, logps[view].float().cpu().tolist()):
                self.values[view][key] = value

    def merge(self, other: ReferenceTable) -> None:
        for view in self.views:
            self.values[view].update(other.values[view])

    def missing(self, keys: Iterable[str]) -> set[str]:
        """The keys some view has no log-prob for."""
        return {k for k in keys if any(k not in self.values.get(v, {}) for v in self.views)}

    def lookup(self, keys: list[str] | None, views: tuple[str, ...], device, ids: list[str] = ()) -> dict[str, Tensor]:
        if keys is None:
            raise ValueError("reference: precomputed: this batch carries no content keys (the DataModule computes them "
                             "before the first step; a DataModule other than PreferenceDataModule cannot be used with it)")
        out = {}
        for view in views:
            if view not in self.values:
                raise ValueError(f"the precomputed reference has no {view!r} log-probs (it holds {list(self.values)})")
            table = self.values[view]
            missing = [rid for rid, k in zip(ids or keys, keys) if k not in table]
            if missing:
                raise ValueError(f"the precomputed reference has no log-probs for records {missing[:5]}: the data "
                                 "changed since it was computed (it is recomputed at the start of a new fit)")
            out[view] = torch.tensor([table[k] for k in keys], dtype=torch.float32, device=device)
        return out

    def __len__(self) -> int:
        return len(next(iter(self.values.values()), {}))

    def save(self, path: Path, meta: dict[str, Any]) -> None:
        """Atomic: a crash mid-write never leaves a partial table under the final name."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"meta": meta, "views": list(self.views), "values": self.values}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # no partial table left behind (a full disk, a kill)
            raise

    @classmethod
    def load(cls, path: Path) -> ReferenceTable:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(tuple(data["views"]), data["values"])
