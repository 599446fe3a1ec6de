"""Checkpoint files: read safely, written atomically, with the random state a bit-identical resume needs.

- `read_checkpoint_meta(path)`: a Lightning checkpoint's metadata (hyper-parameters, our `meddpo` record,
  loop state) without its weights, for checking it before a run. A missing, truncated or foreign file is a
  `CheckpointError` naming the file and what is wrong, never a torch traceback. Files are read with
  `torch.load(weights_only=True)` and memory-mapped; a sharded (FSDP2) directory's `meta.pt` likewise.
- `atomic_write(path, write)`: `write(tmp)` then fsync and rename over `path`: a kill during a save never
  leaves a truncated checkpoint in place of the good one (Lightning's own save goes through a temporary
  file in the system temp directory and `shutil.move`, which is a copy, not a rename, across filesystems).
- `writing(path, what)`: a failed write (disk full, permission, read-only) becomes a one-line `WriteError`
  naming the path and the cause, with the partial file removed; `write_text_atomic` for small text outputs.
- `rng_state()` / `restore_rng_state()`: the torch (CPU and CUDA), numpy and python generators, as plain
  lists so a checkpoint still loads with `weights_only=True`.
- `left_out_record(...)` / `restore_left_out(...)`: frozen weights a checkpoint leaves out (they equal the
  backbone's, which the model is built from on every load), each with a digest of its values; on load they are
  taken from the freshly built model after checking their digests, so a changed backbone is an error.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

METADATA = "meta.pt"  # what Lightning's ModelParallelStrategy writes beside the shards


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the file and the reason."""


class WriteError(OSError):
    """A write that failed (disk full, no permission, a read-only filesystem), as one line naming the path, what
    was being written and the cause; what was there before is intact (writes go to a partial file first)."""

    def __init__(self, path: str | Path, what: str, cause: OSError):
        super().__init__(cause.errno, cause.strerror)
        self.path, self.cause = Path(path), cause
        before = " (the previous one is intact)" if self.path.exists() else ""
        self.message = f"cannot write {what} {path}: {cause.strerror or cause}{before}"

    def __str__(self) -> str:
        return self.message


def remove_partial(path: Path) -> None:
    """Delete a partial file or directory left by a failed write; never raises."""
    try:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    except OSError:
        pass


@contextlib.contextmanager
def writing(path: str | Path, what: str, partial: Path | None = None) -> Iterator[None]:
    """Turn an OSError raised inside into a WriteError naming `path` and `what`, after removing `partial`."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        if partial is not None:
            remove_partial(partial)
        raise WriteError(path, what, e) from e


def write_text_atomic(path: str | Path, text: str, what: str) -> None:
    """`text` to `path` through a partial sibling and a rename; a failure is a WriteError and leaves no partial."""
    with writing(path, what):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), what)


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents other than the weights (see module docstring)."""
    path = Path(path)
    if path.is_dir():
        if not (path / METADATA).is_file() or not (path / ".metadata").is_file():
            raise CheckpointError(f"{path}: a directory, but not a sharded Lightning checkpoint (no {METADATA} / .metadata)")
        file = path / METADATA
    elif path.is_file():
        file = path
    else:
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    if file.stat().st_size == 0:
        raise CheckpointError(f"{file}: the file is empty (an interrupted save?)")
    import torch  # here, not at the top: the programs that only write text start without it (entry.py)

    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is the same answer to the user
        raise CheckpointError(
            f"{file}: cannot be read as a checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}); it may be "
            "truncated by an interrupted save, or not a Lightning checkpoint"
        ) from None
    if not isinstance(checkpoint, dict) or "pytorch-lightning_version" not in checkpoint:
        raise CheckpointError(f"{file}: not a Lightning checkpoint (no 'pytorch-lightning_version' entry)")
    if not path.is_dir() and "state_dict" not in checkpoint:
        raise CheckpointError(f"{file}: a Lightning checkpoint without weights (no 'state_dict')")
    checkpoint.pop("state_dict", None)
    return checkpoint


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        with open(file, "rb") as f:
            os.fsync(f.fileno())


def temporary_sibling(path: Path) -> Path:
    """Where a save goes before it is complete: beside `path` (same filesystem: the rename is atomic), the
    same name on every rank (sharded saves write one directory together), hidden from `last*` globs."""
    return path.with_name(f".{path.name}.partial")


def atomic_write(path: str | Path, write: Callable[[Path], None], what: str = "the file") -> None:
    """`write(tmp)` (a file, or a directory of shards), fsync, then rename over `path` (see module docstring). An
    OSError (a full disk) is a WriteError naming `path`; the partial write is removed, what was at `path` stays."""
    path = Path(path)
    tmp = temporary_sibling(path)
    with writing(path, what, partial=tmp):
        write(tmp)
        commit(tmp, path)


def commit(tmp: Path, path: Path) -> None:
    """Move a fully written `tmp` (file or directory) to `path`, replacing what was there."""
    _fsync_tree(tmp)
    if tmp.is_dir() and path.exists():  # a directory cannot be renamed over another: move the old one aside first
        old = path.with_name(f".{path.name}.{os.getpid()}.old")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)


_DIGEST_CHUNK = 1 << 22
_DIGEST_WEIGHTS: dict[Any, Any] = {}  # (device, chunk) -> int32 position weights 1..2**14 of a chunk


def values_digest(tensor: Any) -> int:
    """A checksum of a tensor's values, not of its dtype (a weight stored in bfloat16 and its float32 original
    agree): the float32 bit patterns, as two 16-bit halves, weighted by position within a chunk and by the chunk's
    index (so a permutation counts), summed exactly in integers (products < 2**31, sums in int64, the total modulo
    2**64): independent of the summation order, so CPU and GPU agree. ~1 s a GiB of float32 on 2 CPU cores."""
    import torch

    flat = tensor.detach().reshape(-1)
    weights = _DIGEST_WEIGHTS.get((flat.device, _DIGEST_CHUNK))
    if weights is None:
        weights = torch.arange(_DIGEST_CHUNK, device=flat.device) % (2**14 - 3) + 1
        weights = _DIGEST_WEIGHTS[(flat.device, _DIGEST_CHUNK)] = weights.int()
    total = 0
    for index, start in enumerate(range(0, flat.numel(), _DIGEST_CHUNK)):
        bits = flat[start : start + _DIGEST_CHUNK].float().view(torch.int32)
        w = weights[: bits.numel()]
        chunk = int(((bits >> 16) * w).sum()) * 65537 + int(((bits & 0xFFFF) * w).sum())
        total += (index + 1) * chunk
    return total % 2**64


def left_out_record(weights: dict[str, Any]) -> dict[str, list[Any]]:
    """{state-dict key: [shape, values digest]} of the weights a checkpoint leaves out."""
    return {key: [list(t.shape), values_digest(t)] for key, t in weights.items()}


def restore_left_out(checkpoint: dict[str, Any], model: Any, where: str, strip: str = "") -> None:
    """Put the weights the checkpoint's record (`meddpo.left_out`) says were left out of its `state_dict` back in,
    from `model` just built (its parameter named as the key less `strip`), each checked against the digest the
    checkpoint kept: the model must have been built from the backbone (and `init_from`) the run was trained from.
    A checkpoint that left nothing out is left as it is."""
    record = (checkpoint.get("meddpo") or {}).get("left_out")
    if not record or "state_dict" not in checkpoint:
        return
    state_dict, built = checkpoint["state_dict"], dict(model.named_parameters(remove_duplicate=False))
    changed = []
    for key, (shape, digest) in record.items():
        tensor = built.get(key.removeprefix(strip))
        if tensor is None or list(tensor.shape) != shape:
            raise CheckpointError(f"{where}: the frozen weight {key} {shape} was left out of the checkpoint (it is "
                                  "rebuilt from the backbone), but the model built now has "
                                  f"{'no such weight' if tensor is None else list(tensor.shape)}: build it from "
                                  "the backbone and init_from the run was trained from")
        if values_digest(tensor) != digest:
            changed.append(key)
        state_dict[key] = tensor
    if changed:
        raise CheckpointError(f"{where}: {len(changed)} of the {len(record)} frozen weights left out of the checkpoint "
                              f"(rebuilt from the backbone on load) differ from the backbone's now, e.g. {changed[0]}: "
                              "the backbone (or init_from) is not the one the run was trained from; point "
                              "model.backbone at that one")


def rng_state() -> dict[str, Any]:
    """Every global generator's state, as plain Python values (weights_only-loadable)."""
    import torch

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
