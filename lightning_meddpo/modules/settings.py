"""A preference module's settings, grouped by what they decide.

The YAML keeps its flat keys (`model.init_args.lr`, `reference`, `scoring`, ...): saved configs and checkpoints
load as they are. `ModuleSettings.of(hparams)` reads them into typed groups, checks them, and warns once for the
deprecated spellings; the module and the units around it read the groups, not loose keys.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

from lightning_meddpo.backbones.adapter import FREEZABLE
from lightning_meddpo.backbones.build import LoraSettings
from lightning_meddpo.policy import Mode, ReferenceStrategy

DEPRECATED_FREEZE_FLAGS = {"freeze_vision_tower": "vision_tower", "freeze_projector": "projector"}


@dataclass(frozen=True)
class ModelSettings:
    """What model to build: the backbone or an earlier run, LoRA, frozen parts, activation checkpointing."""

    backbone: str
    init_from: str | None
    chat_template: str | None
    trust_remote_code: bool
    lora: LoraSettings | None
    freeze: tuple[str, ...]
    gradient_checkpointing: bool


@dataclass(frozen=True)
class ReferenceSettings:
    """The reference the losses compare against. With LoRA a `copy` is the model with adapters off (`adapter`)."""

    strategy: ReferenceStrategy  # the one in effect
    save: bool  # keep a `copy` reference in checkpoints
    cache_dir: str | None  # where `precomputed` log-probs are cached


@dataclass(frozen=True)
class ScoringSettings:
    """How views go through the model (policy.py) and how many response tokens' logits exist at once."""

    mode: Mode
    logp_chunk: int | None


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW (or the configured optimizer) with warmup and a schedule; what a non-finite step does."""

    lr: float
    weight_decay: float
    warmup_ratio: float
    schedule: Literal["cosine", "linear", "constant"]
    nonfinite: Literal["stop", "skip"]


@dataclass(frozen=True)
class ModuleSettings:
    model: ModelSettings
    reference: ReferenceSettings
    scoring: ScoringSettings
    optimizer: OptimizerSettings

    @classmethod
    def of(cls, h, check: bool = False) -> ModuleSettings:
        """The groups of a module's hyper-parameters (`check`: validate them and warn for deprecated keys)."""
        freeze = list(h.get("freeze") or [])
        freeze += [part for flag, part in DEPRECATED_FREEZE_FLAGS.items() if h.get(flag) and part not in freeze]
        lora = h.get("lora")
        lora = LoraSettings(**lora) if isinstance(lora, dict) else lora
        reference = "adapter" if lora is not None and h.get("reference") == "copy" else h.get("reference", "copy")
        settings = cls(
            ModelSettings(h.get("backbone"), h.get("init_from"), h.get("chat_template"), bool(h.get("trust_remote_code")),
                          lora, tuple(freeze), bool(h.get("gradient_checkpointing"))),
            ReferenceSettings(reference, bool(h.get("save_reference")), h.get("reference_cache_dir")),
            ScoringSettings(h.get("scoring", "packed"), h.get("logp_chunk", 1024)),
            OptimizerSettings(h.get("lr"), h.get("weight_decay", 0.0), h.get("warmup_ratio", 0.0),
                              h.get("lr_schedule", "cosine"), h.get("nonfinite", "stop")),
        )
        if check:
            settings.check(h)
        return settings

    def check(self, h) -> None:
        unknown = set(self.model.freeze) - set(FREEZABLE)
        if unknown:
            raise ValueError(f"freeze: unknown part(s) {sorted(unknown)}; known: {list(FREEZABLE)}")
        for flag, part in DEPRECATED_FREEZE_FLAGS.items():
            if h.get(flag):
                warnings.warn(f"{flag}: true is deprecated; write freeze: [{part}] (the one freeze setting)",
                              DeprecationWarning, stacklevel=4)
        if not self.optimizer.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.optimizer.lr} (at lr 0 nothing trains)")
        if self.optimizer.nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {self.optimizer.nonfinite!r}")
        if self.optimizer.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"lr_schedule must be cosine, linear or constant, got {self.optimizer.schedule!r}")


RENAMED_KEYS = {"loss": "loss_type"}  # a deprecated init argument -> the one key for its setting


def renamed_key(family: str, old_key: str, old_value, new_key: str, new_value, default):
    """The value of `new_key`, taking a deprecated `old_key` (configs and checkpoints that still say it) with a
    warning; both given with different values is an error."""
    if old_value is None:
        return new_value
    warnings.warn(f"{family}: `{old_key}: {old_value}` is deprecated; write `{new_key}: {old_value}` (one key chooses "
                  "the formulation in every family)", DeprecationWarning, stacklevel=3)
    if new_value != default and new_value != old_value:
        raise ValueError(f"{family}: `{old_key}: {old_value}` and `{new_key}: {new_value}` disagree; give {new_key} only")
    return old_value


def upgraded(hparams: dict) -> dict:
    """Saved hyper-parameters under today's keys (a checkpoint that says `loss: copo` says `loss_type: copo`)."""
    out = dict(hparams)
    for old, new in RENAMED_KEYS.items():
        if out.get(old) is not None:
            out[new] = out.pop(old)
        else:
            out.pop(old, None)
    return out


def check_choice(family: str, key: str, value: str, known) -> None:
    """Every family chooses its formulation by one key, `loss_type`, from its own table (DPO: losses.DPO_LOSS_TYPES,
    TRL's names; ReferenceFree and Multimodal: their FORMULATIONS), checked at construction."""
    if value not in known:
        raise ValueError(f"{family}: unknown {key} {value!r}; use one of {sorted(known)}")


def check_beta(beta: float) -> None:
    """The implicit-reward temperature must be positive: at 0 the preference terms have no gradient, and
    below 0 they learn the reverse preference while the logged reward accuracy still rises."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta} (0 trains nothing; < 0 learns the rejected answers)")
