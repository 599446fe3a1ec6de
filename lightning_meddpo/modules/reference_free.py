"""Reference-free preference losses: SimPO, CPO, ORPO. No reference model is built or loaded."""

from __future__ import annotations

from torch import Tensor

from lightning_meddpo.data.batch import PreferenceBatch
from lightning_meddpo.losses import cpo_loss, log_odds, nll_loss, orpo_loss, simpo_loss
from lightning_meddpo.modules.base import PreferenceModule, check_beta
from lightning_meddpo.modules.dpo import logps_metrics, reward_metrics

REFERENCE_FREE_LOSSES = ("simpo", "cpo", "orpo")


class ReferenceFree(PreferenceModule):
    """SimPO / CPO / ORPO on the policy alone (`reference` is forced to 'none').

    Args:
        loss: "simpo", "cpo" or "orpo".
        beta: SimPO's and CPO's temperature (ORPO does not use it).
        gamma: SimPO's target margin, in reward units (= beta * TRL's `simpo_gamma`).
        lam: ORPO's lambda, the weight of the odds-ratio term (TRL's ORPO `beta`).
        nll_weight: CPO's behaviour-cloning NLL weight (TRL's `cpo_alpha`).

    Logged rewards follow TRL: simpo `beta * logp/|y|` (length-normalised), cpo `beta * logp`
    (summed), orpo `lam * logp/|y|`. `rewards/accuracies` is always length-normalised
    logp(y_w)/|y_w| > logp(y_l)/|y_l| (for simpo and orpo the same as rewards chosen > rejected;
    for cpo it can differ from the sign of `rewards/margins`).
    """

    def __init__(
        self,
        loss: str = "simpo",
        beta: float = 0.1,
        gamma: float = 0.05,
        lam: float = 0.1,
        nll_weight: float = 1.0,
        *,
        reference: str = "none",
        **kwargs,
    ):
        if loss not in REFERENCE_FREE_LOSSES:
            raise ValueError(f"ReferenceFree: unknown loss {loss!r}; use one of {REFERENCE_FREE_LOSSES}")
        if reference != "none":
            raise ValueError(f"ReferenceFree ({loss}) uses no reference model: reference must be 'none', got {reference!r}")
        if loss in ("simpo", "cpo"):
            check_beta(beta)
        super().__init__(reference="none", **kwargs)
        self.save_hyperparameters()

    @property
    def formulation_name(self) -> str:
        return self.hparams.loss.upper()

    def compute_loss(self, batch: PreferenceBatch) -> tuple[Tensor, dict[str, Tensor]]:
        h = self.hparams
        logps = self.policy.logps(batch, self.views)
        tokens = self.policy.tokens(batch, self.views)
        chosen, rejected = logps["chosen"], logps["rejected"]
        n_w, n_l = tokens["chosen"], tokens["rejected"]
        avg_w, avg_l = chosen / n_w.clamp(min=1), rejected / n_l.clamp(min=1)
        nll = nll_loss(chosen, n_w)
        metrics: dict[str, Tensor] = {"loss/nll": nll.detach()}
        if h.loss == "simpo":
            per_pair = simpo_loss(chosen, rejected, n_w, n_l, beta=h.beta, gamma=h.gamma)
            reward_w, reward_l = h.beta * avg_w, h.beta * avg_l
        elif h.loss == "cpo":
            per_pair = cpo_loss(chosen, rejected, n_w, beta=h.beta, nll_weight=h.nll_weight)
            reward_w, reward_l = h.beta * chosen, h.beta * rejected
        else:
            per_pair = orpo_loss(chosen, rejected, n_w, n_l, lam=h.lam)
            reward_w, reward_l = h.lam * avg_w, h.lam * avg_l
            log_odds_ratio = (log_odds(avg_w) - log_odds(avg_l)).detach()
            metrics["log_odds_ratio"] = log_odds_ratio
            metrics["log_odds_chosen"] = log_odds(avg_w).detach()
        metrics[f"loss/{h.loss}"] = per_pair.detach()
        metrics.update(reward_metrics(reward_w, reward_l))
        metrics["rewards/accuracies"] = (avg_w > avg_l).float().detach()
        metrics.update(logps_metrics(logps))
        return per_pair.mean(), metrics
