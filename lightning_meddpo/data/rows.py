"""Token rows for one forward: how a batch's views become rows of the model's input.

A view is a response with an image: `chosen` / `rejected` on the true image m, `chosen_mprime` /
`rejected_mprime` on the corrupted image m'. Packed, ONE row per (image, pair) carries the prompt once and every
response after it, with a block attention mask (a response sees the prompt and itself, never another response)
and positions that restart after the prompt; unpacked, one row per (view, pair). The policy (policy.py) scores
them; `plan` counts them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_meddpo.attention import PrefixLayout, prefix_layout
from lightning_meddpo.data.batch import EncodedImages, PreferenceBatch, TokenRows

# view -> (response side, image side)
VIEWS: dict[str, tuple[str, str]] = {
    "chosen": ("chosen", "images"),
    "rejected": ("rejected", "images"),
    "chosen_mprime": ("chosen", "rejected_images"),
    "rejected_mprime": ("rejected", "rejected_images"),
}


@dataclass
class Segment:
    """Where one view's response tokens sit in the rows: row index per pair, the predictor position
    of every response token (the hidden state that predicts it), the tokens, and a padding mask."""

    rows: Tensor  # [B]
    predictors: Tensor  # [B, T] positions in the row
    targets: Tensor  # [B, T]
    mask: Tensor  # [B, T] bool


@dataclass
class Rows:
    """Token rows for one forward: one row per (image, pair) with its responses after the prompt
    ("packed"), or one row per (view, pair). `segment_ids` is 0 on the prompt, k on the k-th response
    of the row, -1 on padding; `positions` restart after the prompt for every response."""

    input_ids: Tensor  # [R, L]
    extra: dict[str, Tensor]  # per-token (mm_token_type_ids)
    segment_ids: Tensor  # [R, L]
    positions: Tensor  # [R, L]
    image_side: list[str]  # per row: "images" or "rejected_images"
    pair: Tensor  # [R] the pair each row belongs to
    segments: dict[str, Segment]  # per view
    _masks: dict[torch.dtype, Tensor] = field(default_factory=dict, repr=False)  # block_mask's, per dtype
    _layout: PrefixLayout | None = field(default=None, repr=False)  # prefix_layout's

    @property
    def valid(self) -> Tensor:
        return self.segment_ids >= 0

    def block_mask(self, dtype: torch.dtype) -> Tensor:
        """[R, 1, L, L] additive mask: a token sees earlier tokens of the prompt and of its own segment. Made once
        per dtype (the policy and the reference share it), outside inference_mode (the policy's graph keeps it)."""
        if dtype not in self._masks:
            seg, n = self.segment_ids, self.segment_ids.shape[1]
            key, query = seg[:, None, :], seg[:, :, None]
            with torch.inference_mode(False):
                allowed = (key == query) | (key == 0)
                allowed &= torch.ones(n, n, dtype=torch.bool, device=seg.device).tril()
                allowed &= key >= 0
                allowed.diagonal(dim1=1, dim2=2).fill_(True)  # padding sees itself
                blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=seg.device)
                self._masks[dtype] = torch.where(allowed, torch.zeros((), dtype=dtype, device=seg.device), blocked)[:, None]
        return self._masks[dtype]

    def prefix_layout(self) -> PrefixLayout:
        """The same rule for attention.prefix_sdpa: causal over the row, and where the second and later responses
        look ([R, 1, T, L], T their longest count). Made once, outside inference_mode, like block_mask."""
        if self._layout is None:
            with torch.inference_mode(False):
                self._layout = prefix_layout(self.segment_ids)
        return self._layout


def build_rows(batch: PreferenceBatch, views: tuple[str, ...], packed: bool, pad_id: int = 0) -> Rows:
    """Assemble the rows a forward needs for `views` from the batch's parts (see `Rows`)."""
    groups: dict[str, list[str]] = {}  # image side -> views on it (packed: one row per pair and side)
    plain: list[tuple[str, list[str]]] = []  # or one row per pair and view
    for view in views:
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r}; known: {sorted(VIEWS)}")
        side = VIEWS[view][1]
        if side == "rejected_images" and batch.rejected_images is None:
            raise ValueError(f"view {view!r} needs a corrupted image m' but the batch has none "
                             f"(records {batch.ids[:4]}...): give records a rejected_image or set data.corruption")
        groups.setdefault(side, []).append(view)
        plain.append((side, [view]))
    device = batch.prompt.input_ids.device
    lengths = {name: getattr(batch, name).lengths.tolist() for name in ("chosen", "rejected")}  # one sync each
    rows: list[dict[str, Tensor]] = []
    segment_ids, positions, image_side, pair = [], [], [], []
    starts: dict[str, list[tuple[int, int, int]]] = {v: [] for v in views}  # view -> (row, start, prompt length)
    for side, group_views in (list(groups.items()) if packed else plain):
        prompt = batch.prompt_for(side)
        prompt_lengths = prompt.lengths.tolist()
        for i, p in enumerate(prompt_lengths):
            ids = [prompt.input_ids[i, :p]]
            extras = {k: [v[i, :p]] for k, v in prompt.extra.items()}
            segs, pos = [torch.zeros(p, dtype=torch.long)], [torch.arange(p)]
            offset = p
            for k, view in enumerate(group_views, start=1):
                response, n = getattr(batch, VIEWS[view][0]), lengths[VIEWS[view][0]][i]
                ids.append(response.input_ids[i, :n])
                for key, parts in extras.items():
                    parts.append(torch.zeros(n, dtype=parts[0].dtype, device=device))
                segs.append(torch.full((n,), k, dtype=torch.long))
                pos.append(torch.arange(p, p + n))
                starts[view].append((len(rows), offset, p))
                offset += n
            rows.append({"input_ids": torch.cat(ids), **{k: torch.cat(v) for k, v in extras.items()}})
            segment_ids.append(torch.cat(segs))
            positions.append(torch.cat(pos))
            image_side.append(side)
            pair.append(i)
    stacked = TokenRows.stack(rows, pad_id)
    segments = {}
    for view in views:
        response = getattr(batch, VIEWS[view][0])
        T = max(max(lengths[VIEWS[view][0]]), 1)
        t = torch.arange(T)
        row, start, prompt_len = (torch.tensor(x) for x in zip(*starts[view]))
        predictors = torch.where(t[None] == 0, prompt_len[:, None] - 1, start[:, None] + t[None] - 1)
        mask = t[None] < torch.tensor(lengths[VIEWS[view][0]])[:, None]
        targets = nn.functional.pad(response.input_ids, (0, max(0, T - response.input_ids.shape[1])))[:, :T]
        segments[view] = Segment(row.to(device), predictors.masked_fill(~mask, 0).to(device), targets, mask.to(device))
    return Rows(stacked.input_ids, stacked.extra, _pad(segment_ids, -1).to(device), _pad(positions, 0).to(device),
                image_side, torch.tensor(pair), segments)


def _pad(rows: list[Tensor], value: int) -> Tensor:
    length = max(int(r.numel()) for r in rows)
    out = torch.full((len(rows), length), value, dtype=rows[0].dtype, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return out


def row_images(batch: PreferenceBatch, rows: Rows) -> EncodedImages:
    """The processed image of every row, in row order."""
    parts = []
    for side in dict.fromkeys(rows.image_side):
        picked = [int(rows.pair[r]) for r, s in enumerate(rows.image_side) if s == side]
        parts.append(getattr(batch, side).select(picked))
    return EncodedImages.cat(parts) if len(parts) > 1 else parts[0]
