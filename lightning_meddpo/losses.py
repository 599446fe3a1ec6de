"""Every preference loss as a pure function of sequence log-probs.

Nothing here knows about models, batches or Lightning. Inputs are 1-D tensors with one entry per
pair: summed response log-probs of the policy and the reference, and response token counts where a
formulation length-normalises. Each function returns per-sample losses (shape [B]); callers reduce
(mean, or a weighted mean). `rewards` gives the implicit DPO rewards used for logging.

Notation (DESIGN.md section 4): h(y, m) = logp_theta(y|m) - logp_ref(y|m); the DPO margin is
D = h(y_w, m) - h(y_l, m); sigma is the logistic function, beta the temperature.

Where TRL (huggingface/trl DPOTrainer, CPO/ORPO/KTO trainers) fixed a convention that the paper left
open, we follow TRL and say so in the docstring, so results are comparable with TRL runs.

Registries:
- `DPO_LOSS_TYPES`: `loss_type` name -> f(margin, *, beta, label_smoothing, policy_chosen, ...) -> [B],
  dispatched by `dpo_loss`.
- `LOSSES`: config name -> a loss function of log-probs (every public loss here; DPO-family types
  appear as `dpo_loss` with `loss_type` bound).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping

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


def _require(value: Tensor | None, name: str, loss_type: str) -> Tensor:
    if value is None:
        raise ValueError(f"loss_type {loss_type!r} needs `{name}` (got None)")
    return value


def _check_label_smoothing(label_smoothing: float, loss_type: str, *, open_upper: bool = False) -> None:
    upper_ok = label_smoothing < 0.5 if open_upper else label_smoothing <= 0.5
    if not (label_smoothing >= 0.0 and upper_ok):
        bound = "[0, 0.5)" if open_upper else "[0, 0.5]"
        raise ValueError(f"loss_type {loss_type!r}: label_smoothing must be in {bound}, got {label_smoothing}")


def _smoothed_logistic(logits: Tensor, label_smoothing: float) -> Tensor:
    """-(1-e) log sigma(z) - e log sigma(-z): the (label-smoothed) logistic loss."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


# --------------------------------------------------------------------------------------------------
# DPO family: functions of the margin D (and, for some, the per-side log-ratios)
# --------------------------------------------------------------------------------------------------


@register_dpo_loss("sigmoid")
def sigmoid_loss(margin: Tensor, *, beta: float, label_smoothing: float = 0.0, **_: object) -> Tensor:
    """DPO (Rafailov et al. 2023): -log sigma(beta D).

    label_smoothing = e > 0 is cDPO (conservative DPO, Mitchell 2023): the preference label is
    assumed flipped with probability e, -(1-e) log sigma(beta D) - e log sigma(-beta D).
    At e = 0 this is exactly DPO.
    """
    _check_label_smoothing(label_smoothing, "sigmoid")
    return _smoothed_logistic(beta * margin, label_smoothing)


@register_dpo_loss("ipo")
def ipo_loss(
    margin: Tensor,
    *,
    beta: float,
    policy_chosen: Tensor | None = None,
    policy_rejected: Tensor | None = None,
    reference_chosen: Tensor | None = None,
    reference_rejected: Tensor | None = None,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
    **_: object,
) -> Tensor:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm..."): squared loss regressing the margin
    to 1/(2 beta), which does not saturate (so it does not overfit deterministic preferences).

    Convention (TRL's): the log-ratios are length-normalised per side,
        ((h_w/|y_w| - h_l/|y_l|) - 1/(2 beta))^2,
    because the paper's summed-log-prob form makes the 1/(2 beta) target scale with response length.
    Token counts are clamped at 1. `margin` (summed) is not used; needs the four log-probs and both
    token counts.
    """
    pc = _require(policy_chosen, "policy_chosen", "ipo")
    pr = _require(policy_rejected, "policy_rejected", "ipo")
    rc = _require(reference_chosen, "reference_chosen", "ipo")
    rr = _require(reference_rejected, "reference_rejected", "ipo")
    nc = _require(chosen_tokens, "chosen_tokens", "ipo").clamp(min=1)
    nr = _require(rejected_tokens, "rejected_tokens", "ipo").clamp(min=1)
    normalised_margin = (pc - rc) / nc - (pr - rr) / nr
    return (normalised_margin - 1 / (2 * beta)) ** 2


@register_dpo_loss("hinge")
def hinge_loss(margin: Tensor, *, beta: float, **_: object) -> Tensor:
    """Hinge loss of SLiC (Zhao et al. 2023) / RSO (Liu et al. 2024): relu(1 - beta D)."""
    return torch.relu(1 - beta * margin)


@register_dpo_loss("robust")
def robust_loss(margin: Tensor, *, beta: float, label_smoothing: float = 0.0, **_: object) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"): an unbiased loss under preference
    labels flipped with known rate e = label_smoothing:
        [-(1-e) log sigma(beta D) + e log sigma(-beta D)] / (1 - 2e),  e in [0, 0.5).
    At e = 0 this is DPO.
    """
    _check_label_smoothing(label_smoothing, "robust", open_upper=True)
    e = label_smoothing
    logits = beta * margin
    return (-(1 - e) * F.logsigmoid(logits) + e * F.logsigmoid(-logits)) / (1 - 2 * e)


EXO_DEFAULT_EPSILON = 1e-3


@register_dpo_loss("exo_pair")
def exo_pair_loss(margin: Tensor, *, beta: float, label_smoothing: float = 0.0, **_: object) -> Tensor:
    """Pairwise EXO (Ji et al. 2024, "Towards Efficient Exact Optimization of LM Alignment"):
    reverse KL from the model's pair distribution q = (sigma(beta D), sigma(-beta D)) to the
    smoothed label distribution p = (1 - eps, eps):
        sigma(beta D) [log sigma(beta D) - log(1-eps)] + sigma(-beta D) [log sigma(-beta D) - log eps].
    eps = label_smoothing; TRL's convention: label_smoothing = 0 means eps = 1e-3 (the paper's
    value; eps = 0 would make log eps infinite).
    """
    eps = label_smoothing if label_smoothing > 0 else EXO_DEFAULT_EPSILON
    if not eps < 1.0:
        raise ValueError(f"loss_type 'exo_pair': epsilon (label_smoothing) must be < 1, got {eps}")
    logits = beta * margin
    return torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-eps)) + torch.sigmoid(-logits) * (
        F.logsigmoid(-logits) - math.log(eps)
    )


@register_dpo_loss("nca_pair")
def nca_pair_loss(
    margin: Tensor,
    *,
    beta: float,
    policy_chosen: Tensor | None = None,
    policy_rejected: Tensor | None = None,
    reference_chosen: Tensor | None = None,
    reference_rejected: Tensor | None = None,
    **_: object,
) -> Tensor:
    """Pairwise NCA (Chen et al. 2024, "Noise Contrastive Alignment"), on absolute rewards
    r = beta h rather than the margin, so the chosen likelihood is not pushed down:
        -log sigma(r_w) - 0.5 log sigma(-r_w) - 0.5 log sigma(-r_l).
    """
    r_w = beta * (_require(policy_chosen, "policy_chosen", "nca_pair") - _require(reference_chosen, "reference_chosen", "nca_pair"))
    r_l = beta * (_require(policy_rejected, "policy_rejected", "nca_pair") - _require(reference_rejected, "reference_rejected", "nca_pair"))
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


@register_dpo_loss("bco_pair")
def bco_pair_loss(
    margin: Tensor,
    *,
    beta: float,
    policy_chosen: Tensor | None = None,
    policy_rejected: Tensor | None = None,
    reference_chosen: Tensor | None = None,
    reference_rejected: Tensor | None = None,
    bco_delta: Tensor | float = 0.0,
    **_: object,
) -> Tensor:
    """Pairwise BCO (Jung et al. 2024, "Binary Classifier Optimization"): a binary classifier with
    the implicit reward r = beta h as logit, chosen = 1, rejected = 0, shifted by a baseline delta:
        -log sigma(r_w - delta) - log sigma(-(r_l - delta)).
    delta is the running mean of the rewards (TRL keeps a running mean of the batch mean of
    cat(r_w, r_l)); being stateful it is NOT kept here: the caller passes it as `bco_delta`
    (default 0, i.e. no baseline). `bco_batch_reward_mean` gives the per-batch value to accumulate.
    """
    r_w = beta * (_require(policy_chosen, "policy_chosen", "bco_pair") - _require(reference_chosen, "reference_chosen", "bco_pair"))
    r_l = beta * (_require(policy_rejected, "policy_rejected", "bco_pair") - _require(reference_rejected, "reference_rejected", "bco_pair"))
    delta = bco_delta.detach() if isinstance(bco_delta, Tensor) else bco_delta
    return -F.logsigmoid(r_w - delta) - F.logsigmoid(-(r_l - delta))


def bco_batch_reward_mean(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    *,
    beta: float,
) -> Tensor:
    """Detached mean of cat(beta h_w, beta h_l) over the batch: what a caller feeds into the running
    mean that becomes BCO's `bco_delta` (reduce across ranks before updating it)."""
    r = torch.cat([beta * (policy_chosen - reference_chosen), beta * (policy_rejected - reference_rejected)])
    return r.mean().detach()


@register_dpo_loss("sppo_hard")
def sppo_hard_loss(
    margin: Tensor,
    *,
    beta: float,
    policy_chosen: Tensor | None = None,
    policy_rejected: Tensor | None = None,
    reference_chosen: Tensor | None = None,
    reference_rejected: Tensor | None = None,
    **_: object,
) -> Tensor:
    """SPPO with hard labels (Wu et al. 2024, "Self-Play Preference Optimization"): the win
    probabilities are replaced by 1 (chosen) and 0 (rejected), so each log-ratio regresses to +-1/2
    (scaled by 1/beta, TRL's convention with eta = 1/beta):
        (h_w - 1/(2 beta))^2 + (h_l + 1/(2 beta))^2.
    """
    h_w = _require(policy_chosen, "policy_chosen", "sppo_hard") - _require(reference_chosen, "reference_chosen", "sppo_hard")
    h_l = _require(policy_rejected, "policy_rejected", "sppo_hard") - _require(reference_rejected, "reference_rejected", "sppo_hard")
    return (h_w - 0.5 / beta) ** 2 + (h_l + 0.5 / beta) ** 2


@register_dpo_loss("aot")
def aot_loss(
    margin: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    policy_chosen: Tensor | None = None,
    policy_rejected: Tensor | None = None,
    reference_chosen: Tensor | None = None,
    reference_rejected: Tensor | None = None,
    **_: object,
) -> Tensor:
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal
    Transport"): first-order stochastic dominance of the policy's log-ratio distribution over the
    reference's, enforced by sorting each across the batch (the 1-D optimal transport plan):
        delta_(k) = sort(logp_w - logp_l)_(k) - sort(ref_w - ref_l)_(k),
        loss_(k) = -(1-e) log sigma(beta delta_(k)) - e log sigma(-beta delta_(k)).
    Caveat: entry k belongs to the k-th quantile, NOT to pair k: only the (unweighted) batch mean is
    meaningful, and per-pair weighting does not apply. Follows TRL (`loss_type="aot"`).
    """
    pc = _require(policy_chosen, "policy_chosen", "aot")
    pr = _require(policy_rejected, "policy_rejected", "aot")
    rc = _require(reference_chosen, "reference_chosen", "aot")
    rr = _require(reference_rejected, "reference_rejected", "aot")
    policy_sorted, _ = torch.sort(pc - pr, dim=0)
    reference_sorted, _ = torch.sort(rc - rr, dim=0)
    return _smoothed_logistic(beta * (policy_sorted - reference_sorted), label_smoothing)


@register_dpo_loss("aot_unpaired")
def aot_unpaired_loss(
    margin: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    policy_chosen: Tensor | None = None,
    policy_rejected: Tensor | None = None,
    reference_chosen: Tensor | None = None,
    reference_rejected: Tensor | None = None,
    **_: object,
) -> Tensor:
    """AOT, unpaired (Melnyk et al. 2024): the distribution of chosen log-ratios h_w should dominate
    that of rejected log-ratios h_l, pairing is ignored (sorted separately):
        delta_(k) = sort(h_w)_(k) - sort(h_l)_(k),  loss_(k) = label-smoothed -log sigma(beta delta_(k)).
    Same caveat as `aot`: entries are quantiles, not pairs. TRL's `aot_unpaired` (formerly `aot_pair`).
    """
    h_w = _require(policy_chosen, "policy_chosen", "aot_unpaired") - _require(reference_chosen, "reference_chosen", "aot_unpaired")
    h_l = _require(policy_rejected, "policy_rejected", "aot_unpaired") - _require(reference_rejected, "reference_rejected", "aot_unpaired")
    chosen_sorted, _ = torch.sort(h_w, dim=0)
    rejected_sorted, _ = torch.sort(h_l, dim=0)
    return _smoothed_logistic(beta * (chosen_sorted - rejected_sorted), label_smoothing)


@register_dpo_loss("apo_zero")
def apo_zero_loss(
    margin: Tensor,
    *,
    beta: float,
    policy_chosen: Tensor | None = None,
    policy_rejected: Tensor | None = None,
    reference_chosen: Tensor | None = None,
    reference_rejected: Tensor | None = None,
    **_: object,
) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization"), for when the chosen
    outputs are better than the model's: raise chosen, lower rejected likelihood, anchored at zero:
        (1 - sigma(beta h_w)) + sigma(beta h_l).
    """
    h_w = _require(policy_chosen, "policy_chosen", "apo_zero") - _require(reference_chosen, "reference_chosen", "apo_zero")
    h_l = _require(policy_rejected, "policy_rejected", "apo_zero") - _require(reference_rejected, "reference_rejected", "apo_zero")
    return 1 - torch.sigmoid(beta * h_w) + torch.sigmoid(beta * h_l)


@register_dpo_loss("apo_down")
def apo_down_loss(
    margin: Tensor,
    *,
    beta: float,
    policy_chosen: Tensor | None = None,
    reference_chosen: Tensor | None = None,
    **_: object,
) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024), for when the model is better than the chosen outputs:
    lower both likelihoods, the rejected more (the chosen gradient is deliberately downward
    away from the reference point):
        sigma(beta h_w) + (1 - sigma(beta D)).
    """
    h_w = _require(policy_chosen, "policy_chosen", "apo_down") - _require(reference_chosen, "reference_chosen", "apo_down")
    return torch.sigmoid(beta * h_w) + 1 - torch.sigmoid(beta * margin)


DISCOPOP_DEFAULT_TAU = 0.05


@register_dpo_loss("discopop")
def discopop_loss(
    margin: Tensor, *, beta: float, discopop_tau: float = DISCOPOP_DEFAULT_TAU, **_: object
) -> Tensor:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, "Discovering Preference
    Optimization Algorithms with and for LLMs"): with rho = beta D and mixing weight
    s = sigma(rho / tau), tau = discopop_tau (default 0.05, the paper's and TRL's),
        (1 - s) (-log sigma(rho)) + s exp(-rho).
    The exponential term is computed as exp(log sigma(rho/tau) - rho) so very negative margins do not
    overflow (inf * 0). Note the loss is not monotone in D near D = 0 (as published).
    """
    if not discopop_tau > 0:
        raise ValueError(f"loss_type 'discopop': discopop_tau must be > 0, got {discopop_tau}")
    rho = beta * margin
    mix = torch.sigmoid(rho / discopop_tau)
    return -F.logsigmoid(rho) * (1 - mix) + torch.exp(F.logsigmoid(rho / discopop_tau) - rho)


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
    discopop_tau: float = DISCOPOP_DEFAULT_TAU,
    bco_delta: Tensor | float = 0.0,
) -> Tensor:
    """Per-sample DPO-family loss on the log-ratio margin h(y_w) - h(y_l).

    `loss_type` is a key of `DPO_LOSS_TYPES`. `label_smoothing` is used by sigmoid (cDPO), robust
    (flip rate), exo_pair (epsilon) and aot / aot_unpaired; ignored by the others. `ipo` needs the
    token counts. `discopop_tau` is for discopop, `bco_delta` (running reward mean) for bco_pair.
    """
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
        discopop_tau=discopop_tau,
        bco_delta=bco_delta,
    )


def nll_loss(logps: Tensor, tokens: Tensor) -> Tensor:
    """Length-normalised negative log-likelihood -logp(y)/|y| (the SFT baseline and DPO+NLL term)."""
    return -logps / tokens.clamp(min=1)
