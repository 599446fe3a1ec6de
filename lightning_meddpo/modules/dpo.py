"""DPO family: sigmoid DPO, cDPO (label smoothing), IPO, hinge, robust, ... and DPO+NLL (RPO)."""

from __future__ import annotations

from torch import Tensor

from lightning_meddpo.data.batch import PreferenceBatch
from lightning_meddpo.losses import dpo_loss, nll_loss, rewards
from lightning_meddpo.modules.base import PreferenceModule


def reward_metrics(chosen: Tensor, rejected: Tensor, prefix: str = "rewards") -> dict[str, Tensor]:
    """Implicit-reward metrics every reference-based family logs."""
    return {
        f"{prefix}/chosen": chosen,
        f"{prefix}/rejected": rejected,
        f"{prefix}/margins": chosen - rejected,
        f"{prefix}/accuracies": (chosen > rejected).float(),
    }


class DPO(PreferenceModule):
    """Pairwise preference loss against a reference, optionally plus a length-normalised NLL.

    Args:
        beta: temperature of the implicit reward.
        loss_type: a name from losses.DPO_LOSS_TYPES (sigmoid, ipo, hinge, robust, ...).
        label_smoothing: cDPO / robust-DPO noise rate.
        nll_weight: weight of the NLL on the chosen response (DPO+NLL / RPO; the paper uses 1.0).
    """

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0, nll_weight: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def compute_loss(self, batch: PreferenceBatch) -> tuple[Tensor, dict[str, Tensor]]:
        h = self.hparams
        logps = self.policy.logps(batch, self.views)
        ref = self.policy.reference_logps(batch, self.views)
        tokens = self.policy.tokens(batch, self.views)
        per_pair = dpo_loss(
            logps["chosen"], logps["rejected"], ref["chosen"], ref["rejected"],
            beta=h.beta, loss_type=h.loss_type, label_smoothing=h.label_smoothing,
            chosen_tokens=tokens["chosen"], rejected_tokens=tokens["rejected"],
        )
        metrics = {"loss/dpo": per_pair.detach()}
        loss = per_pair.mean()
        if h.nll_weight:
            nll = nll_loss(logps["chosen"], tokens["chosen"])
            metrics["loss/nll"] = nll.detach()
            loss = loss + h.nll_weight * nll.mean()
        metrics.update(reward_metrics(rewards(logps["chosen"], ref["chosen"], h.beta), rewards(logps["rejected"], ref["rejected"], h.beta)))
        metrics["logps/chosen"] = logps["chosen"].detach()
        metrics["logps/rejected"] = logps["rejected"].detach()
        return loss, metrics
