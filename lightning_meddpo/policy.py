"""PreferencePolicy: the trained model, its reference, and sequence log-probs of views.

A pair is scored under *views* (a response with an image): `chosen` and `rejected` on the true image
m, and `chosen_mprime` / `rejected_mprime` on the corrupted image m'. How the views go through the
model (`PreferencePolicy.mode`):

- "packed" (the default where the model allows it): per image, ONE row `[prompt | chosen | rejected]`
  with a block attention mask (each response sees the prompt and itself, never the other response) and
  position ids that restart after the prompt, so the prompt with its hundreds of image tokens is
  forwarded once per (image, prompt) and both responses attend to it; gradients reach the prompt from
  both. Each unique image is encoded once per step, by the policy, and the reference reuses those
  features when the vision tower and projector are frozen. Only the hidden states that predict
  response tokens go through the LM head and log-softmax.
- "rows": one row per view, the same image-once and LM-head-on-responses economies (for attention
  kernels that cannot take a block mask: flash attention, a sliding window shorter than the row).
- "logits": the model's own forward on one row per view, full logits (TRL's way; for architectures
  without the hooks above). The reason for falling back is logged once.

All three give the same log-probs (tested to 1e-5 in fp32). The reference is a frozen copy (`copy`),
the same model with LoRA adapters disabled (`adapter`), a table of log-probs computed once before
training (`precomputed`, see reference_cache.py: no second model in memory), or absent (`none`,
reference-free losses).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from lightning_meddpo.backbones.build import base_model
from lightning_meddpo.data.batch import EncodedImages, PreferenceBatch, TokenRows
from lightning_meddpo.losses import PairLogps, rewards

log = logging.getLogger(__name__)

ReferenceStrategy = Literal["copy", "adapter", "precomputed", "none"]
Mode = Literal["packed", "rows", "logits"]
# view -> (response side, image side)
VIEWS: dict[str, tuple[str, str]] = {
    "chosen": ("chosen", "images"),
    "rejected": ("rejected", "images"),
    "chosen_mprime": ("chosen", "rejected_images"),
    "rejected_mprime": ("rejected", "rejected_images"),
}
ATTENTION_WITH_BLOCK_MASKS = ("eager", "sdpa")


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout: preference losses compare log-probs that dropout would make noisy."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    configs = [getattr(model, "config", None)]
    while configs:
        cfg = configs.pop()
        if cfg is None:
            continue
        for key, value in list(vars(cfg).items()):
            if "dropout" in key and isinstance(value, float):
                setattr(cfg, key, 0.0)
            elif hasattr(value, "to_dict") and hasattr(value, "model_type"):
                configs.append(value)


def token_logps(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Summed log-probs of `targets` under `logits` ([N, T, V] -> [N]), masked positions excluded.

    gather - logsumexp in float32: no full-vocabulary log-softmax tensor is kept."""
    logits = logits.float()
    safe = targets.masked_fill(~mask, 0)
    picked = torch.gather(logits, -1, safe.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    return (picked * mask).sum(-1)


def _token_logps_chunk(head: nn.Module, states: Tensor, targets: Tensor) -> Tensor:
    logits = head(states).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)


def chunked_token_logps(head: nn.Module, states: Tensor, targets: Tensor, chunk: int | None = 1024) -> Tensor:
    """log p(target) of each token ([M, H] hidden states -> [M]), `chunk` tokens at a time.

    Each chunk's logits ([chunk, vocab], float32) live only inside it: with grad, the chunk is checkpointed, so its
    logits are recomputed in the backward instead of kept, and peak memory does not grow with response tokens x
    vocabulary (LLaVA-Med's Mistral: 32k; Qwen2: 152k entries per token). `chunk=None`: one call (the same values)."""
    if chunk is None or states.shape[0] <= chunk:
        return _token_logps_chunk(head, states, targets)
    grad = torch.is_grad_enabled() and (states.requires_grad or any(p.requires_grad for p in head.parameters()))
    parts = []
    for start in range(0, states.shape[0], chunk):
        s, t = states[start : start + chunk], targets[start : start + chunk]
        if grad:
            parts.append(torch.utils.checkpoint.checkpoint(_token_logps_chunk, head, s, t, use_reentrant=False))
        else:
            parts.append(_token_logps_chunk(head, s, t))
    return torch.cat(parts)


def _is_sharded(module: nn.Module) -> bool:
    """FSDP2 sharded weights (DTensor): every call of the module gathers them."""
    return any(hasattr(p, "full_tensor") for p in module.parameters(recurse=False))


# ---------------------------------------------------------------------------------------------- rows


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

    @property
    def valid(self) -> Tensor:
        return self.segment_ids >= 0

    def block_mask(self, dtype: torch.dtype) -> Tensor:
        """[R, 1, L, L] additive mask: a token sees earlier tokens of the prompt and of its own segment."""
        seg = self.segment_ids
        idx = torch.arange(seg.shape[1], device=seg.device)
        causal = idx[None, :, None] >= idx[None, None, :]
        same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
        allowed = causal & same & (seg[:, None, :] >= 0)
        allowed = allowed | torch.eye(seg.shape[1], dtype=torch.bool, device=seg.device)  # padding sees itself
        mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


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


# ---------------------------------------------------------------------------------------------- model parts


def vision_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the vision tower and the projector (LLaVA: vision_tower + multi_modal_projector;
    Qwen-VL: visual, whose merger is its projector)."""
    core = getattr(base_model(model), "model", None)
    parts = [getattr(core, name, None) for name in ("vision_tower", "multi_modal_projector", "visual")]
    return [p for part in parts if part is not None for p in part.parameters()]


def hidden_path_support(model: nn.Module) -> str | None:
    """None if the model exposes what the hidden-state path uses; else the reason it does not."""
    core = getattr(base_model(model), "model", None)
    if core is None or not hasattr(core, "get_image_features"):
        return f"{type(base_model(model)).__name__} has no `.model.get_image_features`"
    if not hasattr(base_model(model), "lm_head"):
        return f"{type(base_model(model)).__name__} has no `lm_head`"
    return None


def packing_support(model: nn.Module, max_row: int | None = None) -> str | None:
    """None if rows with a block attention mask can go through this model; else why not."""
    config = base_model(model).config
    text = getattr(config, "text_config", config)
    impl = getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", None) or "eager"
    if impl not in ATTENTION_WITH_BLOCK_MASKS:
        return f"attention implementation {impl!r} takes no custom block mask (eager and sdpa do)"
    window = getattr(text, "sliding_window", None) if getattr(text, "use_sliding_window", True) else None
    if window and max_row is not None and max_row > window:
        return f"a packed row ({max_row} tokens) is longer than the sliding window ({window})"
    return None


def is_qwen_vl(model: nn.Module) -> bool:
    return hasattr(getattr(base_model(model), "model", None), "get_rope_index")


@dataclass
class Scores:
    """One batch's scores per view: summed response log-probs under the policy (with grad) and the reference
    (None when reference-free), and the response token counts. Every family's loss is computed from one."""

    policy: dict[str, Tensor]
    reference: dict[str, Tensor] | None
    tokens: dict[str, Tensor]

    def pair(self, preferred: str, dispreferred: str) -> PairLogps:
        """Two views as the pair a loss takes, e.g. ("chosen", "rejected"), or ("chosen", "chosen_mprime") for CoPO."""
        return PairLogps(self.policy[preferred], self.policy[dispreferred], self.reference[preferred],
                         self.reference[dispreferred], self.tokens[preferred], self.tokens[dispreferred])

    def rewards(self, view: str, beta: float) -> Tensor:
        """The implicit reward beta * h(view) = beta * (logp_theta - logp_ref), detached (for logging)."""
        return rewards(self.policy[view], self.reference[view], beta)

    def mean_logp(self, view: str) -> Tensor:
        """The policy's per-token mean log-prob of the view's response (SimPO's and ORPO's length normalisation)."""
        return self.policy[view] / self.tokens[view].clamp(min=1)


class PreferencePolicy(nn.Module):
    """The policy model plus its reference; computes sequence log-probs for views of a batch.

    Args:
        model: the vision-language model (transformers, possibly peft-wrapped).
        reference: "copy", "adapter" or "none" (see module docstring).
        dropout: keep the model's dropout (off by default: it makes log-probs noisy).
        mode: "packed" (default), "rows" or "logits"; a mode the model cannot take falls back to the
            next one, with the reason logged once.
        logp_chunk: response tokens whose vocabulary logits are computed at once ("packed" and "rows";
            see chunked_token_logps); None: all at once.
    """

    def __init__(self, model: nn.Module, reference: ReferenceStrategy = "copy", dropout: bool = False, mode: Mode = "packed",
                 logp_chunk: int | None = 1024):
        super().__init__()
        if logp_chunk is not None and logp_chunk < 1:
            raise ValueError(f"logp_chunk must be >= 1 tokens (or None: one call), got {logp_chunk}")
        self.logp_chunk = logp_chunk
        if reference not in ("copy", "adapter", "precomputed", "none"):
            raise ValueError(f"unknown reference strategy {reference!r}; use copy, adapter, precomputed or none")
        if mode not in ("packed", "rows", "logits"):
            raise ValueError(f"unknown mode {mode!r}; use packed, rows or logits")
        if not dropout:
            disable_dropout(model)
        self.model = model.train()  # from_pretrained returns eval mode
        self.reference_strategy = reference
        self.reference: nn.Module | None = None
        if reference == "copy":
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        elif reference == "adapter" and not hasattr(model, "disable_adapter"):
            raise ValueError("reference='adapter' needs a peft LoRA model (set `lora` in the config)")
        self.reference_table = None  # reference="precomputed": a ReferenceTable, set before training
        self.requested_mode: Mode = mode
        self._fallbacks: set[str] = set()
        self._shared_features: tuple[tuple, dict[str, list[Tensor]]] | None = None
        self._unsharded_calls: str | None = None  # set when FSDP2 sharding rules out calling parts
        self._roots: dict[int, ShardedRoot] = {}  # FSDP2: id(model) -> its root (a plain dict: not submodules)

    # -- strategy -----------------------------------------------------------------------------------
    def mode_for(self, model: nn.Module, max_row: int | None = None) -> Mode:
        """The mode this forward takes: the requested one, unless the model cannot (reason logged once)."""
        mode = self.requested_mode
        if mode == "packed":
            reason = packing_support(model, max_row)
            if reason is not None:
                self._fall_back(f"packed views -> rows: {reason}")
                mode = "rows"
        if mode in ("packed", "rows"):
            reason = self._unsharded_calls or hidden_path_support(model)
            if reason is not None:
                self._fall_back(f"{mode} -> logits (the model's own forward): {reason}")
                mode = "logits"
        return mode

    def _fall_back(self, message: str) -> None:
        if message not in self._fallbacks:
            self._fallbacks.add(message)
            log.warning("PreferencePolicy: %s", message)

    @property
    def shares_image_features(self) -> bool:
        """The reference can reuse the policy's image features: vision tower and projector frozen."""
        return self.reference_strategy in ("copy", "adapter") and not any(p.requires_grad for p in vision_parameters(self.model))

    def fully_shard(self, mesh, **kwargs) -> None:
        """FSDP2: shard the policy model and the `copy` reference over `mesh` (the same way)."""
        for model in (self.model, self.reference):
            if model is not None:
                fully_shard_model(model, mesh, **kwargs)
                self._roots[id(model)] = ShardedRoot.around(model, mesh, **kwargs)
        if not shard_units(self.model):
            self._unsharded_calls = "under FSDP2 its parts cannot be called on their own (tied input/output embeddings)"

    def train(self, mode: bool = True) -> PreferencePolicy:
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # the reference never trains, never drops out
        return self

    # -- log-probs ----------------------------------------------------------------------------------
    @torch.no_grad()
    def starting_logps(self, batch: PreferenceBatch, views: tuple[str, ...]) -> dict[str, Tensor]:
        """Log-probs of the model as it is, in eval mode, without grad: the reference, when it is called
        before the first step (how a precomputed reference is filled)."""
        with _eval(self.model):
            return self._logps(self.model, batch, views, share=False)

    def logps(self, batch: PreferenceBatch, views: tuple[str, ...]) -> dict[str, Tensor]:
        """Policy log-probs per view (with grad)."""
        return self._logps(self.model, batch, views, share=self.shares_image_features)

    def score(self, batch: PreferenceBatch, views: tuple[str, ...], reference: bool = True) -> Scores:
        """The views' log-probs under the policy, then the reference (unless reference-free or not asked for),
        and the token counts."""
        policy = self.logps(batch, views)
        reference = self.reference_logps(batch, views) if reference and self.reference_strategy != "none" else None
        return Scores(policy, reference, self.tokens(batch, views))

    @torch.no_grad()
    def reference_logps(self, batch: PreferenceBatch, views: tuple[str, ...]) -> dict[str, Tensor]:
        """Reference log-probs per view (no grad)."""
        if self.reference_strategy == "none":
            raise ValueError("this policy has no reference model (reference='none')")
        if self.reference_strategy == "precomputed":
            if self.reference_table is None:
                raise ValueError("reference='precomputed': the reference log-probs were not computed before this step")
            return self.reference_table.lookup(batch.keys, views, batch.prompt.input_ids.device, batch.ids)
        if self.reference_strategy == "copy":
            return self._logps(self.reference, batch, views, share=self.shares_image_features)
        with self.model.disable_adapter(), _eval(self.model):
            return self._logps(self.model, batch, views, share=self.shares_image_features)

    @staticmethod
    def tokens(batch: PreferenceBatch, views: tuple[str, ...]) -> dict[str, Tensor]:
        """Response token counts per view."""
        return {v: getattr(batch, VIEWS[v][0]).lengths for v in views}

    def _logps(self, model: nn.Module, batch: PreferenceBatch, views: tuple[str, ...], share: bool) -> dict[str, Tensor]:
        return self.through_root(model, self._views_logps, model, batch, views, share)

    def through_root(self, model: nn.Module, fn, *args):
        """`fn(*args)` for a call into `model` that is not its own forward (our scoring, generation); under FSDP2
        inside the forward of the model's ShardedRoot (see there), else as it is."""
        root = self._roots.get(id(model))
        return root(fn, *args) if root is not None else fn(*args)

    def _views_logps(self, model: nn.Module, batch: PreferenceBatch, views: tuple[str, ...], share: bool) -> dict[str, Tensor]:
        longest = int(batch.prompt.lengths.max()) + sum(int(getattr(batch, VIEWS[v][0]).lengths.max()) for v in views)
        mode = self.mode_for(model, longest)
        rows = build_rows(batch, views, packed=mode == "packed")
        if mode == "logits":
            return self._logits_path(model, batch, rows, views)
        features = self._image_features(model, batch, rows, share)
        hidden = self._hidden(model, batch, rows, features, block_mask=mode == "packed")
        return self._score(model, hidden, rows, views)

    def _image_features(self, model: nn.Module, batch: PreferenceBatch, rows: Rows, share: bool) -> list[Tensor]:
        """Each unique image of the batch encoded once; returned per row. With `share`, the features are
        kept for the next call on the same images (the reference reuses the policy's)."""
        core = base_model(model).model
        sides = list(dict.fromkeys(rows.image_side))
        pixels = [getattr(batch, side).pixel_values for side in sides]
        cached: dict[str, list[Tensor]] = {}
        if share and self._shared_features is not None:
            kept_pixels, kept = self._shared_features  # the pixel tensors themselves: identity, not id()
            cached = {side: kept[side] for side, px in kept_pixels if side in kept and any(px is q for q in pixels)}
        for side in sides:
            if side not in cached:
                images = getattr(batch, side)
                with torch.no_grad() if share else contextlib.nullcontext():
                    out = core.get_image_features(pixel_values=images.pixel_values, **_image_kwargs(images))
                cached[side] = list(out.pooler_output)
        if share:
            self._shared_features = (tuple(zip(sides, pixels)), cached)
        return [cached[side][int(i)] for side, i in zip(rows.image_side, rows.pair)]

    def _hidden(self, model: nn.Module, batch: PreferenceBatch, rows: Rows, features: list[Tensor], block_mask: bool) -> Tensor:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        core = base_model(model).model
        dtype = core.get_input_embeddings().weight.dtype
        if torch.is_autocast_enabled(rows.input_ids.device.type):
            dtype = torch.get_autocast_dtype(rows.input_ids.device.type)
        mask = rows.block_mask(dtype) if block_mask else rows.valid.long()
        positions = rows.positions
        if is_qwen_vl(model):
            positions = qwen_positions(core, batch, rows)
        elif not block_mask:
            positions = None  # one segment per row: the model's own positions
        out = core(
            input_ids=rows.input_ids, attention_mask=mask, position_ids=positions,
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=features)}, use_cache=False,
        )
        return out.last_hidden_state

    def _score(self, model: nn.Module, hidden: Tensor, rows: Rows, views: tuple[str, ...]) -> dict[str, Tensor]:
        """LM head and log-softmax on the predictor positions of every view's response tokens only (no padding),
        in chunks of `logp_chunk` tokens (see chunked_token_logps); summed per pair and view."""
        pairs = len(rows.segments[views[0]].rows)
        at, positions, targets, owners = [], [], [], []
        for k, view in enumerate(views):
            s = rows.segments[view]
            at.append(s.rows[:, None].expand_as(s.predictors)[s.mask])
            positions.append(s.predictors[s.mask])
            targets.append(s.targets.to(hidden.device)[s.mask])
            owners.append(k * pairs + torch.arange(pairs, device=hidden.device)[:, None].expand_as(s.mask)[s.mask])
        states = hidden[torch.cat(at), torch.cat(positions)]  # one gather (one scatter in the backward) for all views
        head = base_model(model).lm_head
        chunk = None if _is_sharded(head) else self.logp_chunk  # an FSDP2 unit gathers per call: one call
        per_token = chunked_token_logps(head, states, torch.cat(targets), chunk)
        sums = torch.zeros(len(views) * pairs, dtype=per_token.dtype, device=per_token.device).index_add(
            0, torch.cat(owners), per_token)
        return dict(zip(views, sums.split(pairs)))

    @staticmethod
    def _logits_path(model: nn.Module, batch: PreferenceBatch, rows: Rows, views: tuple[str, ...]) -> dict[str, Tensor]:
        """The model's own forward on one row per view (TRL's way): full logits, image per row."""
        images = row_images(batch, rows)
        logits = model(
            input_ids=rows.input_ids, attention_mask=rows.valid.long(), pixel_values=images.pixel_values,
            **images.extra, **rows.extra, use_cache=False,
        ).logits
        out = {}
        for view in views:
            s = rows.segments[view]
            out[view] = token_logps(logits[s.rows[:, None], s.predictors], s.targets, s.mask)
        return out


def _image_kwargs(images: EncodedImages) -> dict[str, Tensor]:
    """Processor extras that the image encoder takes (Qwen-VL's image_grid_thw)."""
    return {k: v for k, v in images.extra.items() if k == "image_grid_thw"}


def qwen_positions(core: nn.Module, batch: PreferenceBatch, rows: Rows) -> Tensor:
    """Qwen-VL's 3-D rope positions for the rows, restarted after the prompt for every response.

    `get_rope_index` numbers a row as one sequence; text positions grow by one per token in all three
    dimensions, so a later response is moved back by the length of the responses before it."""
    images = row_images(batch, rows)
    types = rows.extra.get("mm_token_type_ids")
    if types is None:
        raise ValueError("Qwen-VL rows need mm_token_type_ids (the processor returns them)")
    positions, _ = core.get_rope_index(
        rows.input_ids, mm_token_type_ids=types, image_grid_thw=images.extra["image_grid_thw"],
        attention_mask=rows.valid.long(),
    )
    index = torch.arange(rows.input_ids.shape[1], device=positions.device)
    shift = index[None] - rows.positions  # tokens of earlier responses in the row before this one
    return positions - shift[None].clamp(min=0) * (rows.segment_ids > 0)[None]


def shard_layer_classes(model: nn.Module) -> set[str]:
    """Class names of the decoder layers and vision encoder layers (HF's `_no_split_modules`, no embeddings)."""
    base = base_model(model)
    names = set(getattr(base, "_no_split_modules", None) or ())
    return {n for n in names if not n.endswith("Embeddings")}


def shard_units(model: nn.Module, layers: list[nn.Module] | None = None) -> list[nn.Module]:
    """The parameter-owning sub-modules outside the layers, each to be an FSDP2 unit of its own.

    The policy calls parts of the model on their own (image encoder, embeddings, text model, LM head),
    so no weight may be left to the root unit, which gathers only in the root's forward: every
    outermost module that owns parameters directly becomes a unit, and a call to it gathers its weights.
    Units sit below the model classes (a CLIP tower's embeddings and layer norms, not the tower), whose
    output recording transformers keys on the class. Tied input and output embeddings cannot be split
    across units: then none is returned (the policy uses the model's own forward)."""
    base = base_model(model)
    core = getattr(base, "model", None)
    head = getattr(base, "lm_head", None)
    if core is None or head is None or head.weight is core.get_input_embeddings().weight:
        return []
    inside = {id(m) for layer in (layers or []) for m in layer.modules()}
    units: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        if id(module) in inside:
            return
        if any(True for _ in module.parameters(recurse=False)):
            units.append(module)
            return
        for child in module.children():
            visit(child)

    for child in model.children():
        visit(child)
    return units


def fully_shard_model(model: nn.Module, mesh, **kwargs) -> int:
    """`fully_shard` each decoder / vision encoder layer, then the other parameter-owning parts (see
    `shard_units`), then the root; returns the number of layers."""
    from torch.distributed.fsdp import fully_shard

    classes = shard_layer_classes(model)
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise ValueError(f"FSDP2: no layers of {sorted(classes)} in {type(model).__name__}; cannot shard it per layer")
    for layer in layers:
        fully_shard(layer, mesh=mesh, **kwargs)
    for unit in shard_units(model, layers):
        fully_shard(unit, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return len(layers)


class ShardedRoot(nn.Module):
    """The FSDP2 root of a sharded model whose parts the policy calls itself: `root(fn, *args)` runs `fn(*args)`
    inside the root's forward.

    FSDP2 takes the first unit whose forward runs as the root of the units below it, and a root keeps its weights
    gathered after its forward (for the backward that follows at once). Scoring calls the image encoder, the text
    model and the LM head, never the model's forward: each part became a root of its own and the whole model stayed
    gathered through the forward (measured: one extra full copy of the weights on every rank; on one H200 87.9 GiB
    against 59.5 GiB unsharded for LLaVA-Med 7B with LoRA). Run inside this module's forward, every part is a unit
    below one root and reshards after its own forward, as fully_shard's docs ask ("running forward through the
    root module first"). It is kept out of the module tree (the model's weights stay under their own names)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @classmethod
    def around(cls, model: nn.Module, mesh, **kwargs) -> ShardedRoot:
        from torch.distributed.fsdp import fully_shard

        return fully_shard(cls(model), mesh=mesh, **kwargs)

    def forward(self, fn, *args):
        return fn(*args)


@contextlib.contextmanager
def _eval(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
