"""Every preference loss as a pure function of sequence log-probs.

Nothing here knows about models, batches or Lightning. Inputs are 1-D tensors with one entry per
pair: summed response log-probs of the policy and the reference, and response token counts where a
formulation length-normalises. Each function returns per-sample losses (shape [B]); callers reduce
(mean, or a weighted mean). `rewards` gives the implicit DPO rewards used for logging.

Notation (docs/design.md section 4): h(y, m) = logp_theta(y|m) - logp_ref(y|m); the DPO margin is
D = h(y_w, m) - h(y_l, m); sigma is the logistic function, beta the temperature.

Where TRL (huggingface/trl DPOTrainer, CPO/ORPO/KTO trainers) fixed a convention that the paper left
open, we follow TRL and say so in the docstring, so results are comparable with TRL runs.

A pair-wise loss with a reference takes one `PairLogps` (the four log-probs and the token counts of a batch
of pairs) instead of four to six tensors; `Scores` (the policy's output: log-probs per view) hands them out.
The one registry, `DPO_LOSS_TYPES`: `loss_type` name -> f(pair, *, beta, label_smoothing, ...) -> [B],
dispatched by `dpo_loss` (the other families choose among their formulations in modules/).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DPO_LOSS_TYPES: dict[str, Callable[..., Tensor]] = {}


@dataclass(frozen=True)
class PairLogps:
    """A batch of preference pairs as the losses see it: the summed response log-probs of the preferred (w)
    and the dispreferred (l) side under the policy and the reference, [B] each, and the two responses' token
    counts (needed by the length-normalised losses only). For CoPO the dispreferred side is y_w under m',
    for MMedPO y_l under m'."""

    policy_chosen: Tensor
    policy_rejected: Tensor
    reference_chosen: Tensor
    reference_rejected: Tensor
    chosen_tokens: Tensor | None = None
    rejected_tokens: Tensor | None = None

    @property
    def log_ratios(self) -> tuple[Tensor, Tensor]:
        """(h_w, h_l): each side's policy-minus-reference log-ratio."""
        return self.policy_chosen - self.reference_chosen, self.policy_rejected - self.reference_rejected

    @property
    def margin(self) -> Tensor:
        """The DPO margin D = h_w - h_l."""
        h_w, h_l = self.log_ratios
        return h_w - h_l

    def per_token_log_ratios(self, loss_type: str) -> tuple[Tensor, Tensor]:
        """(h_w / |y_w|, h_l / |y_l|), token counts clamped at 1; the counts must be given."""
        if self.chosen_tokens is None or self.rejected_tokens is None:
            raise ValueError(f"loss_type {loss_type!r} needs chosen_tokens and rejected_tokens (got None)")
        h_w, h_l = self.log_ratios
        return h_w / self.chosen_tokens.clamp(min=1), h_l / self.rejected_tokens.clamp(min=1)


def register_dpo_loss(name: str) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register a DPO-family loss `f(pair: PairLogps, *, beta, ...) -> per-sample loss` under `name`."""

    def wrap(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        DPO_LOSS_TYPES[name] = fn
        return fn

    return wrap


def rewards(policy_logps: Tensor, reference_logps: Tensor, beta: float) -> Tensor:
    """Implicit reward beta * (logp_theta - logp_ref), detached: it is for logging."""
    return (beta * (policy_logps - reference_logps)).detach()


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


def _check_label_smoothing(label_smoothing: float, loss_type: str, *, open_upper: bool = False) -> None:
    upper_ok = label_smoothing < 0.5 if open_upper else label_smoothing <= 0.5
    if not (label_smoothing >= 0.0 and upper_ok):
        bound = "[0, 0.5)" if open_upper else "[0, 0.5]"
        raise ValueError(f"loss_type {loss_type!r}: label_smoothing must be in {bound}, got {label_smoothing}")


def _smoothed_logistic(logits: Tensor, label_smoothing: float) -> Tensor:
    """-(1-e) log sigma(z) - e log sigma(-z): the (label-smoothed) logistic loss."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


# --------------------------------------------------------------------------------------------------
# DPO family: functions of a PairLogps (most of its margin D alone, some of the per-side log-ratios)
# --------------------------------------------------------------------------------------------------


@register_dpo_loss("sigmoid")
def sigmoid_loss(pair: PairLogps, *, beta: float, label_smoothing: float = 0.0, **_: object) -> Tensor:
    """DPO (Rafailov et al. 2023): -log sigma(beta D).

    label_smoothing = e > 0 is cDPO (conservative DPO, Mitchell 2023): the preference label is
    assumed flipped with probability e, -(1-e) log sigma(beta D) - e log sigma(-beta D).
    At e = 0 this is exactly DPO.
    """
    _check_label_smoothing(label_smoothing, "sigmoid")
    return _smoothed_logistic(beta * pair.margin, label_smoothing)


@register_dpo_loss("sigmoid_norm")
def sigmoid_norm_loss(pair: PairLogps, *, beta: float, **_: object) -> Tensor:
    """Length-normalised DPO, TRL's `sigmoid_norm` (DPOTrainer, TRL 1.16): the per-side log-ratios divided
    by their response token counts (clamped at 1) before the DPO sigmoid,
        -log sigma(beta (h_w/|y_w| - h_l/|y_l|)).
    """
    h_w, h_l = pair.per_token_log_ratios("sigmoid_norm")
    return -F.logsigmoid(beta * (h_w - h_l))


@register_dpo_loss("ipo")
def ipo_loss(pair: PairLogps, *, beta: float, **_: object) -> Tensor:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm..."): squared loss regressing the margin
    to 1/(2 beta), which does not saturate (so it does not overfit deterministic preferences).

    Convention (TRL's): the log-ratios are length-normalised per side,
        ((h_w/|y_w| - h_l/|y_l|) - 1/(2 beta))^2,
    because the paper's summed-log-prob form makes the 1/(2 beta) target scale with response length.
    Token counts are clamped at 1 and must be given (the summed margin is not used).
    """
    h_w, h_l = pair.per_token_log_ratios("ipo")
    return ((h_w - h_l) - 1 / (2 * beta)) ** 2


@register_dpo_loss("hinge")
def hinge_loss(pair: PairLogps, *, beta: float, **_: object) -> Tensor:
    """Hinge loss of SLiC (Zhao et al. 2023) / RSO (Liu et al. 2024): relu(1 - beta D)."""
    return torch.relu(1 - beta * pair.margin)


@register_dpo_loss("robust")
def robust_loss(pair: PairLogps, *, beta: float, label_smoothing: float = 0.0, **_: object) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"): an unbiased loss under preference
    labels flipped with known rate e = label_smoothing:
        [-(1-e) log sigma(beta D) + e log sigma(-beta D)] / (1 - 2e),  e in [0, 0.5).
    At e = 0 this is DPO.
    """
    _check_label_smoothing(label_smoothing, "robust", open_upper=True)
    e = label_smoothing
    logits = beta * pair.margin
    return (-(1 - e) * F.logsigmoid(logits) + e * F.logsigmoid(-logits)) / (1 - 2 * e)


EXO_DEFAULT_EPSILON = 1e-3


@register_dpo_loss("exo_pair")
def exo_pair_loss(pair: PairLogps, *, beta: float, label_smoothing: float = 0.0, **_: object) -> Tensor:
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
    logits = beta * pair.margin
    return torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-eps)) + torch.sigmoid(-logits) * (
        F.logsigmoid(-logits) - math.log(eps)
    )


@register_dpo_loss("nca_pair")
def nca_pair_loss(pair: PairLogps, *, beta: float, **_: object) -> Tensor:
    """Pairwise NCA (Chen et al. 2024, "Noise Contrastive Alignment"), on absolute rewards
    r = beta h rather than the margin, so the chosen likelihood is not pushed down:
        -log sigma(r_w) - 0.5 log sigma(-r_w) - 0.5 log sigma(-r_l).
    """
    h_w, h_l = pair.log_ratios
    r_w, r_l = beta * h_w, beta * h_l
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


@register_dpo_loss("bco_pair")
def bco_pair_loss(pair: PairLogps, *, beta: float, bco_delta: Tensor | float = 0.0, **_: object) -> Tensor:
    """Pairwise BCO (Jung et al. 2024, "Binary Classifier Optimization"): a binary classifier with
    the implicit reward r = beta h as logit, chosen = 1, rejected = 0, shifted by a baseline delta:
        -log sigma(r_w - delta) - log sigma(-(r_l - delta)).
    delta is the running mean of the rewards (TRL keeps a running mean of the batch mean of
    cat(r_w, r_l)); being stateful it is NOT kept here: the caller passes it as `bco_delta`
    (default 0, i.e. no baseline). `bco_batch_reward_mean` gives the per-batch value to accumulate.
    """
    h_w, h_l = pair.log_ratios
    r_w, r_l = beta * h_w, beta * h_l
    delta = bco_delta.detach() if isinstance(bco_delta, Tensor) else bco_delta
    return -F.logsigmoid(r_w - delta) - F.logsigmoid(-(r_l - delta))


def bco_batch_reward_mean(pair: PairLogps, *, beta: float) -> Tensor:
    """Detached mean of cat(beta h_w, beta h_l) over the batch: what a caller feeds into the running
    mean that becomes BCO's `bco_delta` (reduce across ranks before updating it)."""
    h_w, h_l = pair.log_ratios
    return torch.cat([beta * h_w, beta * h_l]).mean().detach()


@register_dpo_loss("sppo_hard")
def sppo_hard_loss(pair: PairLogps, *, beta: float, **_: object) -> Tensor:
    """SPPO with hard labels (Wu et al. 2024, "Self-Play Preference Optimization"): the win
    probabilities are replaced by 1 (chosen) and 0 (rejected), so each log-ratio regresses to +-1/2
    (scaled by 1/beta, TRL's convention with eta = 1/beta):
        (h_w - 1/(2 beta))^2 + (h_l + 1/(2 beta))^2.
    """
    h_w, h_l = pair.log_ratios
    return (h_w - 0.5 / beta) ** 2 + (h_l + 0.5 / beta) ** 2


@register_dpo_loss("aot")
def aot_loss(pair: PairLogps, *, beta: float, label_smoothing: float = 0.0, **_: object) -> Tensor:
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal
    Transport"): first-order stochastic dominance of the policy's log-ratio distribution over the
    reference's, enforced by sorting each across the batch (the 1-D optimal transport plan):
        delta_(k) = sort(logp_w - logp_l)_(k) - sort(ref_w - ref_l)_(k),
        loss_(k) = -(1-e) log sigma(beta delta_(k)) - e log sigma(-beta delta_(k)).
    Caveat: entry k belongs to the k-th quantile, NOT to pair k: only the (unweighted) batch mean is
    meaningful, and per-pair weighting does not apply. Follows TRL (`loss_type="aot"`).
    """
    policy_sorted, _ = torch.sort(pair.policy_chosen - pair.policy_rejected, dim=0)
    reference_sorted, _ = torch.sort(pair.reference_chosen - pair.reference_rejected, dim=0)
    return _smoothed_logistic(beta * (policy_sorted - reference_sorted), label_smoothing)


@register_dpo_loss("aot_unpaired")
def aot_unpaired_loss(pair: PairLogps, *, beta: float, label_smoothing: float = 0.0, **_: object) -> Tensor:
    """AOT, unpaired (Melnyk et al. 2024): the distribution of chosen log-ratios h_w should dominate
    that of rejected log-ratios h_l, pairing is ignored (sorted separately):
        delta_(k) = sort(h_w)_(k) - sort(h_l)_(k),  loss_(k) = label-smoothed -log sigma(beta delta_(k)).
    Same caveat as `aot`: entries are quantiles, not pairs. TRL's `aot_unpaired` (formerly `aot_pair`).
    """
    h_w, h_l = pair.log_ratios
    chosen_sorted, _ = torch.sort(h_w, dim=0)
    rejected_sorted, _ = torch.sort(h_l, dim=0)
    return _smoothed_logistic(beta * (chosen_sorted - rejected_sorted), label_smoothing)


@register_dpo_loss("apo_zero")
def apo_zero_loss(pair: PairLogps, *, beta: float, **_: object) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization"), for when the chosen
    outputs are better than the model's: raise chosen, lower rejected likelihood, anchored at zero:
        (1 - sigma(beta h_w)) + sigma(beta h_l).
    """
    h_w, h_l = pair.log_ratios
    return 1 - torch.sigmoid(beta * h_w) + torch.sigmoid(beta * h_l)


@register_dpo_loss("apo_down")
def apo_down_loss(pair: PairLogps, *, beta: float, **_: object) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024), for when the model is better than the chosen outputs:
    lower both likelihoods, the rejected more (the chosen gradient is deliberately downward
    away from the reference point):
        sigma(beta h_w) + (1 - sigma(beta D)).
    """
    h_w, _ = pair.log_ratios
    return torch.sigmoid(beta * h_w) + 1 - torch.sigmoid(beta * pair.margin)


DISCOPOP_DEFAULT_TAU = 0.05


@register_dpo_loss("discopop")
def discopop_loss(pair: PairLogps, *, beta: float, discopop_tau: float = DISCOPOP_DEFAULT_TAU, **_: object) -> Tensor:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, "Discovering Preference
    Optimization Algorithms with and for LLMs"): with rho = beta D and mixing weight
    s = sigma(rho / tau), tau = discopop_tau (default 0.05, the paper's and TRL's),
        (1 - s) (-log sigma(rho)) + s exp(-rho).
    The exponential term is computed as exp(log sigma(rho/tau) - rho) so very negative margins do not
    overflow (inf * 0). Note the loss is not monotone in D near D = 0 (as published).
    """
    if not discopop_tau > 0:
        raise ValueError(f"loss_type 'discopop': discopop_tau must be > 0, got {discopop_tau}")
    rho = beta * pair.margin
    mix = torch.sigmoid(rho / discopop_tau)
    return -F.logsigmoid(rho) * (1 - mix) + torch.exp(F.logsigmoid(rho / discopop_tau) - rho)


def dpo_loss(
    pair: PairLogps,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    discopop_tau: float = DISCOPOP_DEFAULT_TAU,
    bco_delta: Tensor | float = 0.0,
) -> Tensor:
    """Per-sample DPO-family loss of a batch of pairs.

    `loss_type` is a key of `DPO_LOSS_TYPES`. `label_smoothing` is used by sigmoid (cDPO), robust
    (flip rate), exo_pair (epsilon) and aot / aot_unpaired; ignored by the others. `ipo` and `sigmoid_norm`
    need the pair's token counts. `discopop_tau` is for discopop, `bco_delta` (running reward mean) for bco_pair.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; known: {sorted(DPO_LOSS_TYPES)}")
    return DPO_LOSS_TYPES[loss_type](
        pair, beta=beta, label_smoothing=label_smoothing, discopop_tau=discopop_tau, bco_delta=bco_delta
    )


def nll_loss(logps: Tensor, tokens: Tensor) -> Tensor:
    """Length-normalised negative log-likelihood -logp(y)/|y| per sequence (the SFT baseline and DPO+NLL
    term; the paper's released DPO+NLL averages per sequence, then over the batch)."""
    return -logps / tokens.clamp(min=1)


def nll_token_mean(logps: Tensor, tokens: Tensor) -> Tensor:
    """Negative log-likelihood averaged over all response tokens of the batch, -sum(logp) / sum(|y|): a
    scalar, TRL's `sft` loss type (DPOTrainer, TRL 1.16, per device batch). Long responses weigh more than
    under `nll_loss(...).mean()`."""
    return -logps.sum() / tokens.sum().clamp(min=1)


def reduce_nll(logps: Tensor, tokens: Tensor, reduction: str) -> Tensor:
    """The batch's NLL, "sequence" (mean of per-sequence means, ours and the paper's) or "token" (TRL's)."""
    if reduction == "sequence":
        return nll_loss(logps, tokens).mean()
    if reduction == "token":
        return nll_token_mean(logps, tokens)
    raise ValueError(f"nll_reduction must be 'sequence' or 'token', got {reduction!r}")


# --------------------------------------------------------------------------------------------------
# Reference-free losses
# --------------------------------------------------------------------------------------------------


def simpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    *,
    beta: float,
    gamma: float,
) -> Tensor:
    """SimPO (Meng et al. 2024): reference-free, the reward is the length-normalised log-prob and a
    target margin gamma separates the pair:
        -log sigma(beta (logp(y_w)/|y_w| - logp(y_l)/|y_l|) - gamma).
    gamma is the paper's margin in reward units; TRL's `simpo_gamma` is gamma/beta instead
    (gamma here = beta * TRL's simpo_gamma). Paper ranges: beta 2-10, gamma 0.3-1.6.
    """
    avg_w = policy_chosen / chosen_tokens.clamp(min=1)
    avg_l = policy_rejected / rejected_tokens.clamp(min=1)
    return -F.logsigmoid(beta * (avg_w - avg_l) - gamma)


def cpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    chosen_tokens: Tensor,
    *,
    beta: float = 0.1,
    nll_weight: float = 1.0,
) -> Tensor:
    """CPO (Xu et al. 2024, "Contrastive Preference Optimization"): DPO with the reference dropped
    (a uniform reference) plus a behaviour-cloning NLL on the chosen response:
        -log sigma(beta (logp(y_w) - logp(y_l))) + nll_weight * (-logp(y_w)/|y_w|).
    Summed log-probs in the preference term (as TRL's CPO sigmoid loss); `beta` is CPO's own
    (default 0.1, TRL's), `nll_weight` is TRL's `cpo_alpha` (default 1.0, the paper's). The NLL
    here is per sample, length-normalised (TRL averages over all chosen tokens of the batch).
    """
    return -F.logsigmoid(beta * (policy_chosen - policy_rejected)) + nll_weight * nll_loss(
        policy_chosen, chosen_tokens
    )


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012): log(-expm1(x)) near 0,
    log1p(-exp(x)) for x < -log 2. Each branch is evaluated only where it is finite."""
    near_zero = x > -math.log(2)
    a = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, -1.0))))
    b = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, -1.0), x)))
    return torch.where(near_zero, a, b)


def log_odds(logps: Tensor) -> Tensor:
    """log(p / (1 - p)) = logp - log(1 - exp(logp)) for a (length-normalised) log-prob logp <= 0.

    logp is clamped to <= -eps(dtype) so that p = 1 (odds infinite) stays finite; computed in at least
    float32.
    """
    x = logps.to(torch.promote_types(logps.dtype, torch.float32))
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return (x - _log1mexp(x)).to(logps.dtype)


def orpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    *,
    lam: float = 0.1,
) -> Tensor:
    """ORPO (Hong et al. 2024, "Monolithic Preference Optimization without Reference Model"):
    SFT plus an odds-ratio preference term, with p = exp(logp(y)/|y|) the length-normalised
    likelihood:
        -logp(y_w)/|y_w| - lam * log sigma(log odds(y_w) - log odds(y_l)),
        log odds(y) = logp/|y| - log(1 - exp(logp/|y|)).
    lam is the paper's lambda (TRL's ORPO `beta`), default 0.1. log(1 - exp(.)) is computed with
    log1mexp care (see `log_odds`), so logp near 0 and very negative are both stable.
    """
    avg_w = policy_chosen / chosen_tokens.clamp(min=1)
    avg_l = policy_rejected / rejected_tokens.clamp(min=1)
    log_odds_ratio = log_odds(avg_w) - log_odds(avg_l)
    return -avg_w - lam * F.logsigmoid(log_odds_ratio)


# --------------------------------------------------------------------------------------------------
# Multimodal losses (image-conditional terms; m' is the corrupted image)
# --------------------------------------------------------------------------------------------------


def copo_loss(pair: PairLogps, *, beta: float = 0.1) -> Tensor:
    """Conditional preference (CoPO, the image term of mDPO, Wang et al. 2024): the same chosen
    answer should be preferred under the true image m over the corrupted image m':
        -log sigma(beta (h(y_w, m) - h(y_w, m'))),
    `pair` = y_w under m (preferred side) and y_w under m' (dispreferred side). Needs log-probs really
    computed under m' (m' = m gives margin 0 and loss log 2).
    """
    return -F.logsigmoid(beta * pair.margin)


def anchor_loss(policy_chosen: Tensor, ref_chosen: Tensor, *, beta: float = 0.1, delta: float = 0.0) -> Tensor:
    """Anchored preference (mDPO, Wang et al. 2024): keeps the chosen reward above the anchor delta
    so the chosen likelihood does not fall while the margins grow:
        -log sigma(beta h(y_w, m) - delta)    (mDPO uses delta = 0).
    """
    return -F.logsigmoid(beta * (policy_chosen - ref_chosen) - delta)


def mmedpo_loss(pair: PairLogps, weights: Tensor | None, *, beta: float = 0.1) -> Tensor:
    """MMedPO (Zhu et al. 2024, "Clinical-Aware Multimodal Preference Optimization"): DPO where the
    rejected side is the hallucinated answer under the noised image m', weighted per pair by its
    clinical relevance w_i (`weighted_score` in the data):
        w_i * (-log sigma(beta (h(y_w, m) - h(y_l, m')))),
    `pair` = y_w under m (preferred side) and y_l under m' (dispreferred side).
    The weights are required: None, a shape mismatch, non-finite or negative values raise ValueError
    (a missing weight must not silently become 1).
    """
    if weights is None:
        raise ValueError("mmedpo_loss needs per-pair clinical-relevance `weights` (got None)")
    if weights.shape != pair.policy_chosen.shape:
        raise ValueError(
            f"mmedpo_loss: `weights` shape {tuple(weights.shape)} != log-prob shape {tuple(pair.policy_chosen.shape)}"
        )
    if not bool(torch.isfinite(weights).all()):
        raise ValueError(f"mmedpo_loss: `weights` must be finite, got {weights.tolist()}")
    if bool((weights < 0).any()):
        raise ValueError(f"mmedpo_loss: `weights` must be >= 0, got {weights.tolist()}")
    margin = pair.margin
    return weights.to(margin.dtype) * -F.logsigmoid(beta * margin)


# --------------------------------------------------------------------------------------------------
# KTO (unpaired)
# --------------------------------------------------------------------------------------------------


def kto_kl_baseline(policy_mismatched_logps: Tensor, reference_mismatched_logps: Tensor) -> Tensor:
    """KTO's reference point z_0: an estimate of KL(pi_theta || pi_ref) from completions paired with
    the wrong prompts/images (TRL shifts the completions by one within the batch):
        z_0 = max(0, mean(logp_theta - logp_ref)), detached (no gradient flows through it).
    Under data parallelism TRL averages the unclamped mean across ranks first; to match, gather the
    inputs across ranks before calling this.
    """
    return (policy_mismatched_logps - reference_mismatched_logps).mean().clamp(min=0).detach()


def kto_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    desirable: Tensor,
    kl_baseline: Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO (Ethayarajh et al. 2024, "Model Alignment as Prospect Theoretic Optimization"), as TRL
    implements it. With h = logp_theta - logp_ref and z_0 = `kl_baseline` (see `kto_kl_baseline`):
        desirable:   desirable_weight   * (1 - sigma(beta (h - z_0)))
        undesirable: undesirable_weight * (1 - sigma(beta (z_0 - h)))
    Returned per sample in input order (TRL concatenates the two groups instead). z_0 is detached.
    The paper advises weights with desirable_weight * n_D / (undesirable_weight * n_U) in [1, 4/3].
    """
    if desirable.dtype != torch.bool:
        raise ValueError(f"kto_loss: `desirable` must be a bool tensor, got dtype {desirable.dtype}")
    if desirable.shape != policy_logps.shape:
        raise ValueError(
            f"kto_loss: `desirable` shape {tuple(desirable.shape)} != log-prob shape {tuple(policy_logps.shape)}"
        )
    z0 = kl_baseline.detach() if isinstance(kl_baseline, Tensor) else kl_baseline
    h = policy_logps - reference_logps
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (h - z0)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - h)))
    return torch.where(desirable, desirable_losses, undesirable_losses)


# --------------------------------------------------------------------------------------------------
# Combining terms (MPO style)
# --------------------------------------------------------------------------------------------------


def combine(terms: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """Weighted sum of per-sample loss terms, sum_k weights[k] * terms[k] (MPO, Wang et al. 2024,
    mixes DPO/BCO/SFT this way; mDPO is DPO + CoPO + anchor). A term without a weight counts with
    weight 1; a weight naming no term raises ValueError (a typo in a config must not vanish).
    """
    if not terms:
        raise ValueError("combine: no loss terms given")
    unknown = sorted(set(weights) - set(terms))
    if unknown:
        raise ValueError(f"combine: weights for unknown terms {unknown}; terms are {sorted(terms)}")
    total: Tensor | None = None
    for name, value in terms.items():
        weighted = weights.get(name, 1.0) * value
        total = weighted if total is None else total + weighted
    assert total is not None
    return total

