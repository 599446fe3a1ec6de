"""Building the policy model from a backbone: loading, earlier weights, LoRA, freezing, checkpointing.

Here, not in the LightningModule, so the module only says what to build (its hyperparameters) and every
backbone detail (where LLaVA and Qwen-VL keep their vision tower, projector and language model) lives
with the backbones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightning_meddpo.backbones.loader import load_model


@dataclass
class LoraSettings:
    """peft LoRA settings; with LoRA the reference is the model with adapters disabled.

    `target_modules` are matched in the language model only, as LLaVA's own LoRA training does (its
    find_all_linear_names skips the vision tower and the projector; CLIP's attention has q/k/v projections
    of the same names); `vision: true` adapts the vision tower too. With the tower unadapted, the
    reference reuses the policy's image features."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    vision: bool = False

    def peft_config(self):
        """The peft.LoraConfig these settings stand for. Ours stay a small dataclass because its short names are
        the config keys users write, and `vision` picks the exclude pattern that LLaVA's own LoRA uses."""
        from peft import LoraConfig

        exclude = None if self.vision else r".*(vision_tower|visual|multi_modal_projector).*"
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, exclude_modules=exclude)


FREEZABLE = ("vision_tower", "projector", "language_model")  # the parts `freeze` can name


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (the same object otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def part_parameters(model: torch.nn.Module, part: str) -> list[torch.nn.Parameter]:
    """Parameters of one part of a LLaVA-style or Qwen-VL model (peft-wrapped or not)."""
    base = base_model(model)
    core = getattr(base, "model", base)
    vision = getattr(core, "vision_tower", None) or getattr(core, "visual", None)
    projector = getattr(core, "multi_modal_projector", None) or getattr(vision, "merger", None)
    if part == "vision_tower":
        if vision is None:
            raise ValueError(f"freeze: {type(base).__name__} has no vision tower (vision_tower / visual)")
        skip = {id(p) for p in projector.parameters()} if projector is not None else set()
        return [p for p in vision.parameters() if id(p) not in skip]
    if part == "projector":
        if projector is None:
            raise ValueError(f"freeze: {type(base).__name__} has no projector (multi_modal_projector / visual.merger)")
        return list(projector.parameters())
    if part == "language_model":
        lm = getattr(core, "language_model", None)
        if lm is None:
            raise ValueError(f"freeze: {type(base).__name__} has no language_model")
        head = getattr(base, "lm_head", None)
        return [*lm.parameters(), *(head.parameters() if head is not None else [])]
    raise ValueError(f"freeze: unknown part {part!r}; known: {list(FREEZABLE)}")


def freeze_parts(model: torch.nn.Module, parts: list[str]) -> None:
    for part in parts:
        for p in part_parameters(model, part):
            p.requires_grad_(False)


def freeze_unused_vision_layers(model: torch.nn.Module) -> list[str]:
    """Freeze LLaVA vision-tower weights the forward never uses; returns their names.

    LLaVA takes features from `vision_feature_layer` (-2 for LLaVA-1.5 / LLaVA-Med): the encoder
    layers after it and CLIP's post_layernorm never get a gradient. Frozen, they are left out of the
    optimizer (an optimizer state without them is what a sharded checkpoint must match on resume)
    and DDP needs no find_unused_parameters for them. Training is unchanged: they would never move.
    """
    base = base_model(model)
    config = base.config
    tower = getattr(getattr(base, "model", base), "vision_tower", None)
    layer = getattr(config, "vision_feature_layer", None)
    encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
    if tower is None or layer is None or encoder is None or not hasattr(encoder, "layers"):
        return []
    n = len(encoder.layers)
    used = max((k if k >= 0 else n + 1 + k) for k in (layer if isinstance(layer, (list, tuple)) else [layer]))
    names = []
    for i in range(used, n):
        for name, p in encoder.layers[i].named_parameters():
            p.requires_grad_(False)
            names.append(f"encoder.layers.{i}.{name}")
    post = getattr(getattr(tower, "vision_model", tower), "post_layernorm", None)
    if post is not None:
        for name, p in post.named_parameters():
            p.requires_grad_(False)
            names.append(f"post_layernorm.{name}")
    return names


def load_policy_weights(model: torch.nn.Module, ckpt_path: str) -> None:
    """Load the policy weights of a Lightning checkpoint (e.g. an SFT run) into `model`."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    prefix = "policy.model."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"{ckpt_path}: no '{prefix}*' weights in this checkpoint")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt_path}: does not match the backbone: missing {missing[:5]}, unexpected {unexpected[:5]}")


def build_policy_model(
    backbone: str,
    init_from: str | None = None,
    lora: LoraSettings | dict | None = None,
    freeze: list[str] | None = None,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """The policy model: `backbone` (or `init_from`, an HF directory or a Lightning .ckpt of an earlier run),
    LoRA-wrapped, partly frozen and activation-checkpointed as asked."""
    source = init_from if init_from and Path(init_from).is_dir() else backbone
    model = load_model(source, trust_remote_code=trust_remote_code)
    if init_from and not Path(init_from).is_dir():
        load_policy_weights(model, init_from)
    return prepare_policy_model(model, lora, freeze, gradient_checkpointing)


def prepare_policy_model(
    model: torch.nn.Module,
    lora: LoraSettings | dict | None = None,
    freeze: list[str] | None = None,
    gradient_checkpointing: bool = False,
) -> torch.nn.Module:
    """LoRA, frozen parts and activation checkpointing on a loaded model (or one built on the meta device:
    `plan` counts what trains on exactly the model training would build)."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora is not None:
        from peft import get_peft_model

        settings = lora if isinstance(lora, LoraSettings) else LoraSettings(**lora)
        model = get_peft_model(model, settings.peft_config())
    freeze_parts(model, list(freeze or []))
    freeze_unused_vision_layers(model)
    return model
