"""Reference-free preference losses: SimPO, CPO, ORPO. No reference model is built or loaded."""

from __future__ import annotations

from torch import Tensor

from lightning_meddpo.data.batch import PreferenceBatch
from lightning_meddpo.losses import (
    Scores,
    cpo_loss,
    log_odds,
    nll_loss,
    orpo_loss,
    simpo_loss,
)
from lightning_meddpo.modules.base import PreferenceModule
from lightning_meddpo.modules.dpo import logps_metrics, reward_metrics
from lightning_meddpo.modules.settings import check_beta, check_choice, renamed_key

# Each formulation: (scores, hyper-parameters) -> (per-pair loss, logged reward of y_w, of y_l, extra metrics).
# The logged rewards follow TRL (see ReferenceFree).


def simpo(s: Scores, h) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    per_pair = simpo_loss(s.policy["chosen"], s.policy["rejected"], s.tokens["chosen"], s.tokens["rejected"],
                          beta=h.beta, gamma=h.gamma)
    return per_pair, h.beta * s.mean_logp("chosen"), h.beta * s.mean_logp("rejected"), {}


def cpo(s: Scores, h) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    per_pair = cpo_loss(s.policy["chosen"], s.policy["rejected"], s.tokens["chosen"], beta=h.beta, nll_weight=h.nll_weight)
    return per_pair, h.beta * s.policy["chosen"], h.beta * s.policy["rejected"], {}


def orpo(s: Scores, h) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    per_pair = orpo_loss(s.policy["chosen"], s.policy["rejected"], s.tokens["chosen"], s.tokens["rejected"], lam=h.lam)
    avg_w, avg_l = s.mean_logp("chosen"), s.mean_logp("rejected")
    extra = {"log_odds_ratio": (log_odds(avg_w) - log_odds(avg_l)).detach(), "log_odds_chosen": log_odds(avg_w).detach()}
    return per_pair, h.lam * avg_w, h.lam * avg_l, extra


FORMULATIONS = {"simpo": simpo, "cpo": cpo, "orpo": orpo}


class ReferenceFree(PreferenceModule):
    """SimPO / CPO / ORPO on the policy alone (`reference` is forced to 'none').

    Args:
        loss_type: "simpo", "cpo" or "orpo" (the formulation; `loss`, its former name, still loads with a warning).
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
        loss_type: str = "simpo",
        beta: float = 0.1,
        gamma: float = 0.05,
        lam: float = 0.1,
        nll_weight: float = 1.0,
        *,
        reference: str = "none",
        loss: str | None = None,
        **kwargs,
    ):
        loss_type = renamed_key("ReferenceFree", "loss", loss, "loss_type", loss_type, "simpo")
        loss = None  # saved as loss_type only
        check_choice("ReferenceFree", "loss_type", loss_type, FORMULATIONS)
        if reference != "none":
            raise ValueError(f"ReferenceFree ({loss_type}) uses no reference model: reference must be 'none', got {reference!r}")
        if loss_type in ("simpo", "cpo"):
            check_beta(beta)
        super().__init__(reference="none", **kwargs)
        self.save_hyperparameters()

    @property
    def formulation_name(self) -> str:
        return self.hparams.loss_type.upper()

    def compute_loss(self, batch: PreferenceBatch) -> tuple[Tensor, dict[str, Tensor]]:
        h = self.hparams
        s = self.policy.score(batch, self.views)
        per_pair, reward_w, reward_l, extra = FORMULATIONS[h.loss_type](s, h)
        metrics: dict[str, Tensor] = {"loss/nll": nll_loss(s.policy["chosen"], s.tokens["chosen"]).detach(), **extra}
        metrics[f"loss/{h.loss_type}"] = per_pair.detach()
        metrics.update(reward_metrics(reward_w, reward_l))
        metrics["rewards/accuracies"] = (s.mean_logp("chosen") > s.mean_logp("rejected")).float().detach()
        metrics.update(logps_metrics(s.policy))
        return per_pair.mean(), metrics
