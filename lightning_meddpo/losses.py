"""Every preference loss as a pure function of sequence log-probs.

Nothing here knows about models, batches or Lightning. Inputs are 1-D tensors with one entry per
pair: summed response log-probs of the policy and the reference, and response token counts where a
formulation length-normalises. Each function returns per-sample losses (shape [B]); callers reduce
(mean, or a weighted mean). `rewards` gives the implicit DPO rewards used for logging.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

DPO_LOSS_TYPES: dict[str, Callable[..., Tensor]] = {}


def register_dpo_loss(name: str) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register a DPO-family loss `f(logits, *, beta, ...) -> per-sample loss` under `name`."""

    def wrap(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        DPO_LOSS_TYPES[name] = fn
        return fn

    return wrap


def rewards(policy_logps: Tensor, reference_logps: Tensor, beta: float) -> Tensor:
    """Implicit reward beta * (logp_theta - logp_ref), detached: it is for logging."""
    return (beta * (policy_logps - reference_logps)).detach()


@register_dpo_loss("sigmoid")
def sigmoid_loss(margin: Tensor, *, beta: float, label_smoothing: float = 0.0, **_: object) -> Tensor:
    """DPO (Rafailov et al. 2023); label_smoothing > 0 is cDPO (conservative DPO)."""
    logits = beta * margin
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
) -> Tensor:
    """Per-sample DPO-family loss on the log-ratio margin h(y_w) - h(y_l)."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; known: {sorted(DPO_LOSS_TYPES)}")
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return DPO_LOSS_TYPES[loss_type](
        margin,
        beta=beta,
        label_smoothing=label_smoothing,
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        reference_chosen=reference_chosen,
        reference_rejected=reference_rejected,
        chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
    )


def nll_loss(logps: Tensor, tokens: Tensor) -> Tensor:
    """Length-normalised negative log-likelihood -logp(y)/|y| (the SFT baseline and DPO+NLL term)."""
    return -logps / tokens.clamp(min=1)
