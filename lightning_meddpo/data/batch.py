"""Typed batches that flow from the data layer to the policy.

A pair is scored under several *views*: a response (chosen or rejected) paired with an image (the
true image m, or the corrupted image m'). The collator encodes each response once per view it is
needed in; the policy scores all requested views in one forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class EncodedText:
    """Padded token tensors for one response side; labels are -100 outside the response."""

    input_ids: Tensor  # [B, L]
    attention_mask: Tensor  # [B, L]
    labels: Tensor  # [B, L]
    extra: dict[str, Tensor] = field(default_factory=dict)  # e.g. mm_token_type_ids (Qwen2-VL)

    @property
    def response_tokens(self) -> Tensor:
        """[B] number of scored (response) tokens per row."""
        return (self.labels[:, 1:] != -100).sum(-1)


@dataclass
class EncodedImages:
    """Processor outputs for one image per pair: pixel_values plus model-specific extras."""

    pixel_values: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)  # e.g. image_grid_thw (Qwen2-VL)


@dataclass
class PreferenceBatch:
    """A batch of preference pairs, ready for PreferencePolicy."""

    ids: list[str]
    chosen: EncodedText
    rejected: EncodedText
    images: EncodedImages
    rejected_images: EncodedImages | None = None  # m': corrupted image, for image-side terms
    weights: Tensor | None = None  # [B] per-pair weight (MMedPO's weighted_score)
    image_rejected: Tensor | None = None  # [B] bool: targeted mix, True = image-side pair
    desirable: Tensor | None = None  # [B] bool: unpaired (KTO) examples, `chosen` = their completion

    def __len__(self) -> int:
        return len(self.ids)


def pad_stack(rows: list[Tensor], value: int, side: str = "right") -> Tensor:
    """Stack 1-D tensors of different lengths into [B, max_len], padding with `value`."""
    length = max(int(r.numel()) for r in rows)
    out = torch.full((len(rows), length), value, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        if side == "right":
            out[i, : r.numel()] = r
        else:
            out[i, length - r.numel() :] = r
    return out


__all__ = ["EncodedImages", "EncodedText", "PreferenceBatch", "pad_stack"]
