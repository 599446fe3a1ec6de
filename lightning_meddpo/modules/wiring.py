"""What a preference module adds to the trainer: its optimizer and schedule, and the callbacks it needs."""

from __future__ import annotations

import torch

LR_LOGGING = {"interval": "step", "name": "train/lr"}  # stepped per optimizer step; LearningRateMonitor's key


def default_callbacks(module) -> list:
    """A PredictionWriter (predictions.jsonl in the run's log dir), PrecomputedReference for `reference:
    precomputed`, and with a logger Lightning's LearningRateMonitor (the lr as `train/lr`, every logged step),
    unless the trainer has them configured."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    from lightning_meddpo.eval.generate import PredictionWriter
    from lightning_meddpo.modules.precomputed import PrecomputedReference

    wanted = [PredictionWriter()]
    if module.reference_strategy == "precomputed":
        wanted.append(PrecomputedReference())
    if module.trainer.loggers:
        wanted.append(LearningRateMonitor(logging_interval="step"))
    return [c for c in wanted if not any(isinstance(have, type(c)) for have in module.trainer.callbacks)]


def has_fused_adamw(params: list[torch.nn.Parameter]) -> bool:
    """torch has a fused AdamW for these parameters: floating point, on CPU or CUDA (DTensor shards included)."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def optimizers(module, optimizer_factory=None, scheduler_factory=None) -> dict:
    """AdamW + linear warmup and the schedule (the default), or the configured optimizer / scheduler. AdamW is
    torch's fused kernel where the parameters' device has one (CPU, CUDA): the HF Trainer's default since torch 2.8
    (`adamw_torch_fused`, what TRL trains with); the same update, one kernel instead of a dozen ops per tensor."""
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    s = module.settings.optimizer
    params = [p for p in module.policy.model.parameters() if p.requires_grad]
    if optimizer_factory is None:
        optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, fused=has_fused_adamw(params))
    else:
        optimizer = optimizer_factory(params)
        for group in optimizer.param_groups:  # lr and weight_decay: one place for them, ours
            group["lr"] = s.lr
            if "weight_decay" in group:
                group["weight_decay"] = s.weight_decay
    if scheduler_factory is not None:
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler_factory(optimizer), **LR_LOGGING}}
    total = max(1, int(module.trainer.estimated_stepping_batches))
    warmup = int(s.warmup_ratio * total)
    if s.schedule == "cosine":
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    elif s.schedule == "linear":
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, **LR_LOGGING}}
