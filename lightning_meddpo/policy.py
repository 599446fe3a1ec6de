"""PreferencePolicy: the trained model, its reference, and sequence log-probs.

A pair is scored under *views* (a response with an image): `chosen` and `rejected` on the true image
m, and `chosen_mprime` / `rejected_mprime` on the corrupted image m'. All requested views go through
the model in ONE concatenated forward. The reference is a frozen copy (`copy`), the same model with
LoRA adapters disabled (`adapter`), or absent (`none`, reference-free losses).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_meddpo.data.batch import EncodedImages, EncodedText, PreferenceBatch

ReferenceStrategy = Literal["copy", "adapter", "none"]
VIEWS: dict[str, tuple[str, str]] = {
    "chosen": ("chosen", "images"),
    "rejected": ("rejected", "images"),
    "chosen_mprime": ("chosen", "rejected_images"),
    "rejected_mprime": ("rejected", "rejected_images"),
}


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


def _concat_views(texts: list[EncodedText], images: list[EncodedImages]) -> dict[str, Tensor]:
    """Right-pad every view to one length and concatenate along the batch dimension."""
    length = max(t.input_ids.shape[1] for t in texts)

    def pad(x: Tensor, value: int) -> Tensor:
        return nn.functional.pad(x, (0, length - x.shape[1]), value=value)

    inputs = {
        "input_ids": torch.cat([pad(t.input_ids, 0) for t in texts]),
        "attention_mask": torch.cat([pad(t.attention_mask, 0) for t in texts]),
        "labels": torch.cat([pad(t.labels, -100) for t in texts]),
        "pixel_values": torch.cat([i.pixel_values for i in images]),
    }
    for key in texts[0].extra:
        inputs[key] = torch.cat([pad(t.extra[key], 0) for t in texts])
    for key in images[0].extra:
        inputs[key] = torch.cat([i.extra[key] for i in images])
    return inputs


def sequence_logps(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed log-probs of the labelled (response) tokens, and their count, per row.

    Uses gather - logsumexp so no full-vocabulary log-softmax tensor is materialised.
    """
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    mask = labels != -100
    safe = labels.masked_fill(~mask, 0)
    token_logps = torch.gather(logits, -1, safe.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


class PreferencePolicy(nn.Module):
    """The policy model plus its reference; computes sequence log-probs for views of a batch."""

    def __init__(self, model: nn.Module, reference: ReferenceStrategy = "copy", dropout: bool = False):
        super().__init__()
        if reference not in ("copy", "adapter", "none"):
            raise ValueError(f"unknown reference strategy {reference!r}; use copy, adapter or none")
        if not dropout:
            disable_dropout(model)
        self.model = model.train()  # from_pretrained returns eval mode
        self.reference_strategy = reference
        self.reference: nn.Module | None = None
        if reference == "copy":
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        elif reference == "adapter" and not hasattr(model, "disable_adapter"):
            raise ValueError("reference='adapter' needs a peft LoRA model (set `lora` in the config)")

    def fully_shard(self, mesh, **kwargs) -> None:
        """FSDP2: shard the policy model and the `copy` reference over `mesh` (the same way)."""
        fully_shard_model(self.model, mesh, **kwargs)
        if self.reference is not None:
            fully_shard_model(self.reference, mesh, **kwargs)

    def train(self, mode: bool = True) -> PreferencePolicy:
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # the reference never trains, never drops out
        return self

    def _views(self, batch: PreferenceBatch, views: tuple[str, ...]) -> dict[str, Tensor]:
        texts, images = [], []
        for view in views:
            text_side, image_side = VIEWS[view]
            image = getattr(batch, image_side)
            if image is None:
                raise ValueError(
                    f"view {view!r} needs a corrupted image m' but the batch has none (records {batch.ids[:4]}...): "
                    "give records a rejected_image or set data.corruption"
                )
            texts.append(getattr(batch, text_side))
            images.append(image)
        return _concat_views(texts, images)

    def _logps(self, model: nn.Module, batch: PreferenceBatch, views: tuple[str, ...]) -> dict[str, Tensor]:
        inputs = self._views(batch, views)
        labels = inputs.pop("labels")
        logits = model(**inputs, use_cache=False).logits
        logps, _ = sequence_logps(logits, labels)
        return dict(zip(views, logps.split(len(batch))))

    def logps(self, batch: PreferenceBatch, views: tuple[str, ...]) -> dict[str, Tensor]:
        """Policy log-probs per view (with grad)."""
        return self._logps(self.model, batch, views)

    @torch.no_grad()
    def reference_logps(self, batch: PreferenceBatch, views: tuple[str, ...]) -> dict[str, Tensor]:
        """Reference log-probs per view (no grad)."""
        if self.reference_strategy == "none":
            raise ValueError("this policy has no reference model (reference='none')")
        if self.reference_strategy == "copy":
            return self._logps(self.reference, batch, views)
        with self.model.disable_adapter(), _eval(self.model):
            return self._logps(self.model, batch, views)

    @staticmethod
    def tokens(batch: PreferenceBatch, views: tuple[str, ...]) -> dict[str, Tensor]:
        """Response token counts per view."""
        return {v: getattr(batch, VIEWS[v][0]).response_tokens for v in views}


def shard_layer_classes(model: nn.Module) -> set[str]:
    """Class names of the decoder layers and vision encoder layers (HF's `_no_split_modules`, no embeddings)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return {n for n in names if not n.endswith("Embeddings")}


def fully_shard_model(model: nn.Module, mesh, **kwargs) -> int:
    """`fully_shard` each decoder / vision encoder layer, then the root; returns the number of layers."""
    from torch.distributed.fsdp import fully_shard

    classes = shard_layer_classes(model)
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise ValueError(f"FSDP2: no layers of {sorted(classes)} in {type(model).__name__}; cannot shard it per layer")
    for layer in layers:
        fully_shard(layer, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return len(layers)


@contextlib.contextmanager
def _eval(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
