"""PreferencePolicy: the trained model, its reference, and sequence log-probs of views.

A pair is scored under *views* (a response with an image): `chosen` and `rejected` on the true image m, and
`chosen_mprime` / `rejected_mprime` on the corrupted image m'. How the views go through the model (`mode`):

- "packed" (the default where the model allows it): per image, ONE row `[prompt | chosen | rejected]` with a
  block attention mask (each response sees the prompt and itself, never the other response) and position ids
  that restart after the prompt, so the prompt with its hundreds of image tokens is forwarded once per (image,
  prompt); gradients reach the prompt from both responses. Under sdpa the block rule runs as causal attention plus
  a small correction for the later responses (attention.py: no [L, L] mask); under eager as an additive mask.
  Each unique image is encoded once per step, by the policy, and the reference reuses those features when the
  vision tower and projector are frozen. Only the hidden states that predict response tokens go through the LM
  head and log-softmax.
- "rows": one row per view, the same economies (for attention kernels that cannot take a block mask).
- "logits": the model's own forward on one row per view, full logits (TRL's way; for architectures without
  the hooks above). The reason for falling back is logged once.

All three give the same log-probs (tested to 1e-5 in fp32). The reference is a frozen copy (`copy`), the same
model with LoRA adapters disabled (`adapter`), a table of log-probs computed once before training
(`precomputed`, reference_cache.py: no second model in memory), or absent (`none`, reference-free losses).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_meddpo.attention import use_prefix_attention, uses_prefix_attention
from lightning_meddpo.backbones.adapter import adapter_for
from lightning_meddpo.backbones.build import disable_dropout
from lightning_meddpo.backbones.sharding import (
    ShardedRoot,
    fully_shard_model,
    is_sharded,
    shard_units,
)
from lightning_meddpo.data.batch import PreferenceBatch
from lightning_meddpo.data.rows import VIEWS, Rows, build_rows, row_images
from lightning_meddpo.logps import chunked_token_logps, token_logps
from lightning_meddpo.losses import Scores

log = logging.getLogger(__name__)

ReferenceStrategy = Literal["copy", "adapter", "precomputed", "none"]
Mode = Literal["packed", "rows", "logits"]


class PreferencePolicy(nn.Module):
    """The policy model plus its reference; computes sequence log-probs for views of a batch.

    Args:
        model: the vision-language model (transformers, possibly peft-wrapped).
        reference: "copy", "adapter", "precomputed" or "none" (see the module docstring).
        dropout: keep the model's dropout (off by default: it makes log-probs noisy).
        mode: "packed", "rows" or "logits"; one the model cannot take falls back to the next (reason logged once).
        logp_chunk: response tokens whose logits are computed at once (chunked_token_logps); None: all at once.
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
        if mode == "packed" and adapter_for(model).known:
            use_prefix_attention(adapter_for(model).text_config(model))  # sdpa -> sdpa with packed rows' attention
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
        self._last_rows: tuple[Tensor, tuple, Mode, Rows] | None = None  # _rows: the last batch's
        self._unsharded_calls: str | None = None  # set when FSDP2 sharding rules out calling parts
        self._roots: dict[int, ShardedRoot] = {}  # FSDP2: id(model) -> its root (a plain dict: not submodules)

    # -- strategy -----------------------------------------------------------------------------------
    def mode_for(self, model: nn.Module, max_row: int | None = None) -> Mode:
        """The mode this forward takes: the requested one, unless the model cannot (reason logged once)."""
        mode = self.requested_mode
        if mode == "packed":
            reason = adapter_for(model).packing_support(model, max_row)
            if reason is not None:
                self._fall_back(f"packed views -> rows: {reason}")
                mode = "rows"
        if mode in ("packed", "rows"):
            reason = self._unsharded_calls or adapter_for(model).scoring_support(model)
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
        vision = adapter_for(self.model).vision_parameters(self.model)
        return self.reference_strategy in ("copy", "adapter") and not any(p.requires_grad for p in vision)

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
    def starting_logps(self, batch: PreferenceBatch, views: tuple[str, ...]) -> dict[str, Tensor]:
        """Log-probs of the model as it is (eval mode, no grad): how a precomputed reference is filled before step 1."""
        with self._no_autograd(), _eval(self.model):
            logps = self._logps(self.model, batch, views, share=False)
        return _plain(logps)

    def logps(self, batch: PreferenceBatch, views: tuple[str, ...]) -> dict[str, Tensor]:
        """Policy log-probs per view (with grad)."""
        return self._logps(self.model, batch, views, share=self.shares_image_features)

    def score(self, batch: PreferenceBatch, views: tuple[str, ...], reference: bool = True) -> Scores:
        """The views' log-probs under the policy and the reference (unless reference-free or not asked), token counts."""
        policy = self.logps(batch, views)
        reference = self.reference_logps(batch, views) if reference and self.reference_strategy != "none" else None
        return Scores(policy, reference, self.tokens(batch, views))

    def reference_logps(self, batch: PreferenceBatch, views: tuple[str, ...]) -> dict[str, Tensor]:
        """Reference log-probs per view: under inference_mode (no autograd records, no version counters), in the
        precision the step runs in (the caller's autocast), reusing the policy's image features where the tower
        and projector are frozen; with LoRA the policy's own weights with the adapters off."""
        if self.reference_strategy == "none":
            raise ValueError("this policy has no reference model (reference='none')")
        if self.reference_strategy == "precomputed":
            if self.reference_table is None:
                raise ValueError("reference='precomputed': the reference log-probs were not computed before this step")
            return self.reference_table.lookup(batch.keys, views, batch.prompt.input_ids.device, batch.ids)
        share = self.shares_image_features
        if self.reference_strategy == "copy":
            with self._no_autograd():  # the copy is always in eval mode
                logps = self._logps(self.reference, batch, views, share=share)
        else:
            with self._no_autograd(), self.model.disable_adapter(), _eval(self.model):
                logps = self._logps(self.model, batch, views, share=share)
        return _plain(logps)

    def _no_autograd(self):
        """inference_mode; no_grad under FSDP2, whose parameter all-gathers write into tensors that outlive it."""
        return torch.no_grad() if self._roots else torch.inference_mode()

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
        rows = self._rows(batch, views, mode)
        if mode == "logits":
            return self._logits_path(model, batch, rows, views)
        features = self._image_features(model, batch, rows, share)
        hidden = self._hidden(model, batch, rows, features, block_mask=mode == "packed")
        return self._score(model, hidden, rows, views)

    def _rows(self, batch: PreferenceBatch, views: tuple[str, ...], mode: Mode) -> Rows:
        """The batch's rows (and their block mask), built once for the policy and the reference of a step."""
        last = self._last_rows  # keyed by the batch's own tensor (identity, not id()), the views and the mode
        if last is None or last[0] is not batch.prompt.input_ids or last[1:3] != (views, mode):
            with torch.inference_mode(False):  # ordinary tensors: the policy's graph may keep them
                last = self._last_rows = (batch.prompt.input_ids, views, mode, build_rows(batch, views, mode == "packed"))
        return last[3]

    def _image_features(self, model: nn.Module, batch: PreferenceBatch, rows: Rows, share: bool) -> list[Tensor]:
        """Each unique image of the batch encoded once; returned per row. With `share`, the features are
        kept for the next call on the same images (the reference reuses the policy's)."""
        adapter = adapter_for(model)
        core = adapter.core(model)
        sides = list(dict.fromkeys(rows.image_side))
        pixels = [getattr(batch, side).pixel_values for side in sides]
        cached: dict[str, list[Tensor]] = {}
        if share and self._shared_features is not None:
            kept_pixels, kept = self._shared_features  # the pixel tensors themselves: identity, not id()
            cached = {side: kept[side] for side, px in kept_pixels if side in kept and any(px is q for q in pixels)}
        for side in sides:
            if side not in cached:
                images = getattr(batch, side)
                with _shareable() if share else contextlib.nullcontext():
                    cached[side] = adapter.image_features(core, images)
        if share:
            self._shared_features = (tuple(zip(sides, pixels)), cached)
        return [cached[side][int(i)] for side, i in zip(rows.image_side, rows.pair)]

    def _hidden(self, model: nn.Module, batch: PreferenceBatch, rows: Rows, features: list[Tensor], block_mask: bool) -> Tensor:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        adapter = adapter_for(model)
        core = adapter.core(model)
        dtype = core.get_input_embeddings().weight.dtype
        if torch.is_autocast_enabled(rows.input_ids.device.type):
            dtype = torch.get_autocast_dtype(rows.input_ids.device.type)
        extra = {}
        if block_mask and uses_prefix_attention(adapter.text_config(model)):
            extra["prefix_layout"] = layout = rows.prefix_layout()  # causal + a correction: no [L, L] mask
            mask = layout.mask  # 4-D: transformers hands it on as it is (see attention.prefix_sdpa)
        else:
            mask = rows.block_mask(dtype) if block_mask else rows.valid.long()
        positions = adapter.positions(core, rows, lambda: row_images(batch, rows))
        if positions is None:
            positions = rows.positions if block_mask else None  # one segment per row: the model's own positions
        out = core(
            input_ids=rows.input_ids, attention_mask=mask, position_ids=positions,
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=features)}, use_cache=False, **extra,
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
        head = adapter_for(model).lm_head(model)
        chunk = None if is_sharded(head) else self.logp_chunk  # an FSDP2 unit gathers per call: one call
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


def _plain(logps: dict[str, Tensor]) -> dict[str, Tensor]:
    """Ordinary copies (a few numbers) of log-probs made under inference_mode: a loss may save them for backward."""
    return {view: t.clone() if t.is_inference() else t for view, t in logps.items()}


@contextlib.contextmanager
def _shareable():
    """No grad, ordinary tensors (outside inference_mode): features the reference makes, the policy may take."""
    with torch.inference_mode(False), torch.no_grad():
        yield


@contextlib.contextmanager
def _eval(model: nn.Module):
    was_training = model.training
    try:
        yield model.eval()
    finally:
        model.train(was_training)
