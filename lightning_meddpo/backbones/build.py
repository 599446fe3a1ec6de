"""Building the policy model from a backbone: loading, earlier weights, LoRA, freezing, checkpointing.

Here, not in the LightningModule, so the module only says what to build (its hyperparameters) and every
backbone detail (where LLaVA and Qwen-VL keep their vision tower, projector and language model) lives
with the backbones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lightning_meddpo.backbones.adapter import Backbone, adapter_for
from lightning_meddpo.backbones.loader import load_model
from lightning_meddpo.checkpoints import restore_left_out


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

    def peft_config(self, model: nn.Module | None = None):
        """The peft.LoraConfig these settings stand for, for `model`'s family. Ours stay a small dataclass because
        its short names are the config keys users write, and `vision` picks the family's exclude pattern (the one
        LLaVA's own LoRA uses: the vision side)."""
        from peft import LoraConfig

        exclude = None if self.vision else (adapter_for(model) if model is not None else Backbone()).lora_exclude
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, exclude_modules=exclude)


def part_parameters(model: torch.nn.Module, part: str) -> list[torch.nn.Parameter]:
    """Parameters of one of FREEZABLE, as the model's family keeps it (backbones/adapter.py)."""
    return adapter_for(model).part_parameters(model, part)


def freeze_parts(model: torch.nn.Module, parts: list[str]) -> None:
    for part in parts:
        for p in part_parameters(model, part):
            p.requires_grad_(False)


def freeze_unused_vision_layers(model: torch.nn.Module) -> list[str]:
    """Freeze the weights the forward never uses (LLaVA: the vision layers after `vision_feature_layer`); returns
    their names. Frozen, they are left out of the optimizer (an optimizer state without them is what a sharded
    checkpoint must match on resume) and DDP needs no find_unused_parameters for them. Training is unchanged:
    they would never move."""
    unused = adapter_for(model).unused_parameters(model)
    for _, p in unused:
        p.requires_grad_(False)
    return [name for name, _ in unused]


# Layers whose weights autocast hands to its kernels in the low precision (torch's autocast op lists: linear, conv).
AUTOCAST_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def dtype_name(dtype: torch.dtype | None) -> str:
    """"bfloat16" for torch.bfloat16 (the name config.json and the command line use); "" for None."""
    return str(dtype).removeprefix("torch.") if dtype is not None else ""


@dataclass
class FrozenStorage:
    """What `store_frozen_in` did: parameters (values) stored in the low precision, and those it left in theirs
    because the low precision does not hold them exactly."""

    stored: int = 0
    kept: int = 0


def store_frozen_in(model: nn.Module, dtype: torch.dtype, exact_only: bool = True) -> FrozenStorage:
    """Store the frozen weights of linear and convolution layers in `dtype`, the dtype autocast computes them in.

    Under a mixed precision (Lightning's bf16-mixed) autocast casts every such float32 weight to bfloat16 at each
    forward, and the copy of a frozen weight lives on until the backward, which multiplies by it: a frozen 7B
    language model (LoRA's base, a `copy` reference) costs its float32 weights plus a bfloat16 copy, 6 bytes a value
    where 2 do. Stored in `dtype`, autocast has nothing to cast and the forward is bitwise the same (the cast is the
    same round-to-nearest, made once). A layer is stored so only when all its parameters are frozen and used by no
    other layer (a tied LM head shares the input embeddings, which autocast does not cast). `exact_only`: only
    tensors `dtype` holds exactly (a backbone saved in `dtype`), so weights a checkpoint saves keep their values;
    a `copy` reference, never saved, takes any."""
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)
    done = FrozenStorage()
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if not isinstance(module, AUTOCAST_LAYERS) or not params or any(p.requires_grad for p in params):
            continue
        if any(len(owners[id(p)]) > 1 for p in params) or all(p.dtype == dtype for p in params):
            continue
        count = sum(p.numel() for p in params)
        if exact_only and not all(torch.equal(p.detach().to(dtype).to(p.dtype), p.detach()) for p in params):
            done.kept += count
            continue
        module.to(dtype)
        done.stored += count
    return done


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


def load_policy_weights(model: torch.nn.Module, ckpt_path: str) -> None:
    """Load the policy weights of a Lightning checkpoint (e.g. an SFT run) into `model`."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    state, prefix = checkpoint["state_dict"], "policy.model."
    restore_left_out(checkpoint, model, ckpt_path, strip=prefix)  # frozen weights it left out: this model's, checked
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
        model = get_peft_model(model, settings.peft_config(model))
    freeze_parts(model, list(freeze or []))
    freeze_unused_vision_layers(model)
    return model
