"""Typed batches that flow from the data layer to the policy.

A pair is kept as its parts, each encoded once: the prompt on image m (chat template rendered once,
image tokens expanded by the processor), the prompt on the corrupted image m' where its expansion
differs (Qwen-VL: the token count follows the image size), the chosen and the rejected response tokens,
and the processed images. The policy assembles the *views* a loss needs (a response on an image) from
these parts: either one row per view, or one packed row per image whose responses share the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

IGNORE_INDEX = -100  # the label of a token that is not scored (HF's convention)


# Tensors up to this size are pickled as bytes when a DataLoader worker sends a batch (see _SentByValue).
BY_VALUE_BYTES = 256 * 1024
_NUMPY_DTYPES = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                 torch.float32, torch.float64}


class _Values(NamedTuple):
    """A tensor's values, pickled as bytes (a numpy array): what `_SentByValue` sends in place of a small tensor."""

    array: np.ndarray


def _to_wire(value: Any) -> Any:
    if (isinstance(value, Tensor) and value.device.type == "cpu" and not value.requires_grad
            and value.dtype in _NUMPY_DTYPES and value.numel() * value.element_size() <= BY_VALUE_BYTES):
        return _Values(value.numpy())
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    return value


def _from_wire(value: Any) -> Any:
    if isinstance(value, _Values):
        return torch.from_numpy(value.array)
    if isinstance(value, dict):
        return {k: _from_wire(v) for k, v in value.items()}
    return value


class _SentByValue:
    """Pickled with its small tensors as bytes. A DataLoader worker sends each tensor's storage through shared
    memory as a file descriptor, which the main process fetches over a new authenticated socket: ~0.3 ms a
    tensor, ~3 ms for a batch's nine. Token rows, lengths and flags are a few kB, so only the pixels go that way
    (benchmarks/vs_trl.py --threads 1 --num-workers 1: the main process's wait for a batch 3.8 -> 1.3 ms)."""

    def __getstate__(self) -> dict[str, Any]:
        return {k: _to_wire(v) for k, v in self.__dict__.items()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({k: _from_wire(v) for k, v in state.items()})


@dataclass
class TokenRows(_SentByValue):
    """Right-padded token rows [B, L] with their true lengths; `extra` holds per-token tensors of the
    same shape (e.g. Qwen2-VL's mm_token_type_ids)."""

    input_ids: Tensor
    lengths: Tensor  # [B] long
    extra: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def row(self, i: int) -> dict[str, Tensor]:
        """Row i without padding: input_ids and every extra."""
        n = int(self.lengths[i])
        return {"input_ids": self.input_ids[i, :n], **{k: v[i, :n] for k, v in self.extra.items()}}

    def select(self, index: list[int] | Tensor) -> TokenRows:
        index = torch.as_tensor(index, dtype=torch.long)
        return TokenRows(self.input_ids[index], self.lengths[index], {k: v[index] for k, v in self.extra.items()})

    def to(self, device) -> TokenRows:
        return TokenRows(self.input_ids.to(device), self.lengths.to(device), {k: v.to(device) for k, v in self.extra.items()})

    @staticmethod
    def stack(rows: list[dict[str, Tensor]], pad_id: int) -> TokenRows:
        """Rows of {"input_ids": [L_i], extra...} -> right-padded TokenRows (extras padded with 0)."""
        lengths = torch.tensor([int(r["input_ids"].numel()) for r in rows], dtype=torch.long)
        extra = {k: pad_stack([r[k] for r in rows], 0) for k in rows[0] if k != "input_ids"}
        return TokenRows(pad_stack([r["input_ids"] for r in rows], pad_id), lengths, extra)


@dataclass
class EncodedImages(_SentByValue):
    """Processor outputs for one image per pair: pixel_values plus model-specific extras.

    Processors that flatten patches (Qwen2-VL: `image_grid_thw`) put every image's patches in one
    [sum(patches), D] tensor; `select` splits it per image first."""

    pixel_values: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)  # e.g. image_grid_thw (Qwen2-VL)

    def __len__(self) -> int:
        grid = self.extra.get("image_grid_thw")
        return int(grid.shape[0]) if grid is not None else int(self.pixel_values.shape[0])

    def per_image(self) -> list[Tensor]:
        grid = self.extra.get("image_grid_thw")
        if grid is None:
            return list(self.pixel_values.split(1))
        return list(self.pixel_values.split(grid.prod(-1).tolist()))

    def select(self, index: list[int] | Tensor) -> EncodedImages:
        index = torch.as_tensor(index, dtype=torch.long)
        chunks = self.per_image()
        pixels = torch.cat([chunks[i] for i in index.tolist()]) if len(index) else self.pixel_values[:0]
        return EncodedImages(pixels, {k: v[index] for k, v in self.extra.items()})

    def to(self, device) -> EncodedImages:
        return EncodedImages(self.pixel_values.to(device), {k: v.to(device) for k, v in self.extra.items()})

    @staticmethod
    def cat(items: list[EncodedImages]) -> EncodedImages:
        """One batch of images. Processors that tile an image into a varying number of patches (LLaVA-NeXT's
        anyres: [images, patches, C, H, W]) are padded with zero patches to the most, as their processor pads a
        batch; the encoder reads each image's own count from its size."""
        pixels = [i.pixel_values for i in items]
        if pixels[0].dim() == 5 and len({p.shape[1] for p in pixels}) > 1:
            most = max(p.shape[1] for p in pixels)
            pixels = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[1])) for p in pixels]
        return EncodedImages(
            pixel_values=torch.cat(pixels),
            extra={k: torch.cat([i.extra[k] for i in items]) for k in items[0].extra},
        )


@dataclass
class PreferenceBatch(_SentByValue):
    """A batch of preference pairs as parts (see the module docstring), ready for PreferencePolicy.

    An unpaired (KTO) batch has `desirable` set; its one completion per row is `chosen` (and `rejected`
    is the same object). In a batch where only some pairs have an m' (the targeted mix: text pairs beside
    image pairs), the others carry m itself as m' and `has_mprime` is False for them."""

    ids: list[str]
    prompt: TokenRows  # the prompt on image m, image tokens expanded
    chosen: TokenRows  # response tokens only (every one is scored)
    rejected: TokenRows
    images: EncodedImages
    rejected_images: EncodedImages | None = None  # m': corrupted image, for image-side terms
    prompt_mprime: TokenRows | None = None  # the prompt on m' where its image expansion differs from m's
    has_mprime: Tensor | None = None  # [B] bool: the pair has a real m' (False: m stands in for it)
    weights: Tensor | None = None  # [B] per-pair weight (MMedPO's weighted_score)
    image_rejected: Tensor | None = None  # [B] bool: targeted mix, True = image-side pair
    desirable: Tensor | None = None  # [B] bool: unpaired (KTO) examples, `chosen` = their completion
    keys: list[str] | None = None  # per pair: its content key (what a precomputed reference is looked up by)

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device) -> PreferenceBatch:
        """Every tensor on `device` (a blocking copy: batches are not pinned); ids and the rest as they are."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (TokenRows, EncodedImages)):
                moved[f.name] = value.to(device)
            elif isinstance(value, Tensor):
                moved[f.name] = value.to(device)
        if self.rejected is self.chosen:  # an unpaired batch: one completion, kept one object
            moved["rejected"] = moved["chosen"]
        return replace(self, **moved)

    def sequence_tokens(self) -> int:
        """Tokens of every pair's chosen and rejected sequences (prompt + response each, no padding):
        the work of a step as TRL counts it, whatever the policy packs."""
        return int(2 * self.prompt.lengths.sum() + self.chosen.lengths.sum() + self.rejected.lengths.sum())

    def prompt_for(self, image_side: str) -> TokenRows:
        """The prompt rows for image m ("images") or m' ("rejected_images")."""
        if image_side == "rejected_images" and self.prompt_mprime is not None:
            return self.prompt_mprime
        return self.prompt

    def with_stand_in_mprime(self) -> PreferenceBatch:
        """The batch with m standing in as m' where a pair has none (marked in `has_mprime`), so that
        views on m' can be scored for every row; the rows without a real m' are to be masked."""
        if self.rejected_images is not None:
            return self
        return replace(self, rejected_images=self.images, has_mprime=torch.zeros(len(self), dtype=torch.bool))

    def mismatched(self, shift: int = 1) -> PreferenceBatch:
        """Row i: the responses of pair i on the prompt AND image of pair (i+shift) % B (KTO's KL
        baseline pairs completions with the wrong inputs, as TRL's KTO collator does)."""
        order = [(i + shift) % len(self) for i in range(len(self))]
        moved = {"prompt": self.prompt.select(order), "images": self.images.select(order)}
        if self.rejected_images is not None:
            moved["rejected_images"] = self.rejected_images.select(order)
        if self.prompt_mprime is not None:
            moved["prompt_mprime"] = self.prompt_mprime.select(order)
        ids = [f"{self.ids[i]}|{self.ids[j]}" for i, j in enumerate(order)]
        return replace(self, ids=ids, **moved)


def pad_stack(rows: list[Tensor], value: int, side: str = "right") -> Tensor:
    """Stack 1-D tensors of different lengths into [B, max_len], padding with `value`."""
    length = max(int(r.numel()) for r in rows)
    out = torch.full((len(rows), length), value, dtype=rows[0].dtype, device=rows[0].device)
    for i, r in enumerate(rows):
        if side == "right":
            out[i, : r.numel()] = r
        else:
            out[i, length - r.numel() :] = r
    return out


__all__ = ["EncodedImages", "IGNORE_INDEX", "PreferenceBatch", "TokenRows", "pad_stack"]
