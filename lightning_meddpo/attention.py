"""Attention for packed rows without an [L, L] mask: one causal pass and a small correction.

A packed row is `[prompt | response 1 | response 2 ...]` (data/rows.py): a response sees the prompt and itself,
never another response. Causal attention over the whole row is already exactly that for the prompt and for
response 1 (and padding sits at the end, where no real token looks). Only the tokens of the second and later
responses see too much: the responses before theirs. So `prefix_sdpa` runs SDPA with `is_causal` over every row
(the fast kernels: flash on the GPU, no mask tensor), then lets those later tokens alone attend again under a mask
of [their count x row length], and puts their outputs in place. On LLaVA-Med's shape (620-token rows, answers of
~20 tokens) that is ~0.8x the time of SDPA with the full block mask, forward and backward
(benchmarks/packed_attention.py), and the mask shrinks from rows x L x L to rows x ~20 x L.

It is a transformers attention implementation (`AttentionInterface`) named `NAME`: the policy switches a language
model from "sdpa" to it (`use_prefix_attention`); without a `prefix_layout` argument it IS sdpa (generation, the
unpacked paths), with its mask creation. The name is not saved with a model (transformers drops the attention
implementation from a saved config).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NAME = "meddpo_prefix_sdpa"


@dataclass(frozen=True)
class PrefixLayout:
    """Where the tokens of second and later responses sit: `queries[r, t]` is the position of row r's t-th such token
    (0 past its count: `valid` False); `mask[r, 0, t, j]`: whether it sees position j (the prompt, and its own
    response up to itself). `rows`/`positions`: the valid entries, flat."""

    queries: Tensor  # [R, T] long
    valid: Tensor  # [R, T] bool
    mask: Tensor  # [R, 1, T, L] bool
    rows: Tensor  # [N] long
    positions: Tensor  # [N] long


def prefix_layout(segment_ids: Tensor) -> PrefixLayout:
    """The layout of packed rows from their segment ids ([R, L]: 0 prompt, k the k-th response, -1 padding)."""
    rows, length = segment_ids.shape
    later = segment_ids >= 2
    counts = later.sum(1)
    width = int(counts.max()) if rows else 0
    order = torch.argsort((~later).to(torch.uint8), dim=1, stable=True)[:, :width]  # later tokens first, in order
    valid = torch.arange(width, device=segment_ids.device)[None] < counts[:, None]
    queries = order.masked_fill(~valid, 0)  # past the count: position 0, a prompt token (sees the prompt, finite)
    own = segment_ids.gather(1, queries)[:, :, None]
    keys = segment_ids[:, None, :]
    upto = torch.arange(length, device=segment_ids.device)[None, None, :] <= queries[:, :, None]
    mask = ((keys == 0) | ((keys == own) & upto))[:, None]
    flat_rows = torch.arange(rows, device=segment_ids.device)[:, None].expand_as(queries)[valid]
    return PrefixLayout(queries, valid, mask, flat_rows, queries[valid])


def prefix_sdpa(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                prefix_layout: PrefixLayout | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' sdpa_attention_forward; with `prefix_layout`, packed rows' attention (module docstring), the
    `attention_mask` argument then unused (the policy passes the layout's mask there: a 4-D mask is handed to the
    layers as it is, so transformers builds no [L, L] mask of its own from the rows' restarting positions)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if prefix_layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out, _ = sdpa_attention_forward(module, query, key, value, None, **kwargs)  # causal: [R, L, H, D]
    layout = prefix_layout
    if layout.positions.numel() == 0:
        return out, None
    rows = torch.arange(query.shape[0], device=query.device)[:, None]
    later_query = query.transpose(1, 2)[rows, layout.queries].transpose(1, 2)  # [R, H, T, D]
    later, _ = sdpa_attention_forward(module, later_query, key, value, layout.mask, **kwargs)  # [R, T, H, D]
    return out.index_put((layout.rows, layout.positions), later[layout.valid]), None


def use_prefix_attention(config) -> bool:
    """Switch a language model's config from "sdpa" to `NAME` (registered on first use); True if it now uses it.
    Other implementations are left as they are (eager takes the block mask; flash kernels take neither)."""
    if getattr(config, "_attn_implementation", None) == "sdpa":
        _register()
        config._attn_implementation = NAME
    return uses_prefix_attention(config)


def uses_prefix_attention(config) -> bool:
    return getattr(config, "_attn_implementation", None) == NAME


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, prefix_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # without a layout: sdpa's masks (padding, generation)
