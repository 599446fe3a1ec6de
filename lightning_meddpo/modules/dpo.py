"""DPO family: sigmoid DPO, cDPO (label smoothing), IPO, hinge, robust, ... and DPO+NLL (RPO).

Also the metric helpers every family shares (`reward_metrics`, `image_reward_metrics`,
`logps_metrics`) and the cross-rank mean (`global_mean`), so modules stay thin.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_meddpo.data.batch import PreferenceBatch
from lightning_meddpo.losses import (
    DISCOPOP_DEFAULT_TAU,
    DPO_LOSS_TYPES,
    Scores,
    bco_batch_reward_mean,
    combine,
    dpo_loss,
    nll_loss,
    reduce_nll,
)
from lightning_meddpo.modules.base import PreferenceModule
from lightning_meddpo.modules.settings import check_beta, check_choice


def reward_metrics(chosen: Tensor, rejected: Tensor, prefix: str = "rewards") -> dict[str, Tensor]:
    """Implicit-reward metrics every family logs (`rewards/accuracies` is the checkpoint monitor key)."""
    chosen, rejected = chosen.detach(), rejected.detach()
    return {
        f"{prefix}/chosen": chosen,
        f"{prefix}/rejected": rejected,
        f"{prefix}/margins": chosen - rejected,
        f"{prefix}/accuracies": (chosen > rejected).float(),
    }


def image_reward_metrics(chosen_m: Tensor, chosen_mprime: Tensor) -> dict[str, Tensor]:
    """How much the preferred answer depends on the true image: beta*h(y_w, m) vs beta*h(y_w, m')."""
    chosen_m, chosen_mprime = chosen_m.detach(), chosen_mprime.detach()
    return {
        "rewards_img/chosen_m": chosen_m,
        "rewards_img/chosen_mprime": chosen_mprime,
        "rewards_img/margins": chosen_m - chosen_mprime,
        "rewards_img/accuracies": (chosen_m > chosen_mprime).float(),
    }


def logps_metrics(logps: dict[str, Tensor]) -> dict[str, Tensor]:
    """`logps/<view>` for every scored view (summed response log-probs of the policy)."""
    return {f"logps/{view}": value.detach() for view, value in logps.items()}


def global_mean(module: PreferenceModule, value: Tensor) -> Tensor:
    """Mean of a scalar over all ranks (itself on one process); detached."""
    value = value.detach().float()
    trainer = module._trainer
    if trainer is not None and trainer.world_size > 1:
        value = module.all_gather(value).mean()
    return value


class DPO(PreferenceModule):
    """Pairwise preference loss against a reference, optionally plus a length-normalised NLL.

    Args:
        beta: temperature of the implicit reward.
        loss_type: a name from losses.DPO_LOSS_TYPES (sigmoid, sigmoid_norm, ipo, hinge, robust, exo_pair,
            nca_pair, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop).
        label_smoothing: cDPO / robust-DPO noise rate (exo_pair's epsilon, aot's smoothing).
        nll_weight: weight of the NLL on the chosen response (DPO+NLL / RPO; the paper uses 1.0).
        nll_reduction: "sequence" (each sequence's per-token mean, then the batch mean: the paper's) or
            "token" (the mean over all chosen tokens of the batch: TRL's `sft` loss type).
        discopop_tau: DiscoPOP's mixing temperature.
        bco_baseline: bco_pair's reward shift delta: "running_mean" (BCO as published, and TRL's BCOTrainer)
            or "none" (delta = 0: TRL 1.16 DPOTrainer's `bco_pair`).

    bco_pair's baseline delta is the running mean (over training steps, every step's batch mean
    reduced across ranks, equal weight per step, as TRL's RunningMoments) of the rewards
    cat(beta h_w, beta h_l); it is updated before use on training steps only and kept in the buffers
    `bco_reward_mean` / `bco_reward_count` (registered only for bco_pair), so it is saved in
    checkpoints.
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        nll_weight: float = 0.0,
        discopop_tau: float = DISCOPOP_DEFAULT_TAU,
        nll_reduction: Literal["sequence", "token"] = "sequence",
        bco_baseline: Literal["running_mean", "none"] = "running_mean",
        **kwargs,
    ):
        check_beta(beta)
        check_choice("DPO", "loss_type", loss_type, DPO_LOSS_TYPES)
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if loss_type == "bco_pair" and bco_baseline == "running_mean":  # only then: other runs keep their keys
            self.register_buffer("bco_reward_mean", torch.zeros(()))
            self.register_buffer("bco_reward_count", torch.zeros((), dtype=torch.long))

    @property
    def formulation_name(self) -> str:
        return f"DPO (loss_type {self.hparams.loss_type})"

    def _bco_delta(self, s: Scores) -> Tensor:
        if self.training:
            batch_mean = bco_batch_reward_mean(s.pair("chosen", "rejected"), beta=self.hparams.beta)
            batch_mean = global_mean(self, batch_mean).to(self.bco_reward_mean.device)
            self.bco_reward_count += 1
            self.bco_reward_mean += (batch_mean - self.bco_reward_mean) / self.bco_reward_count
        return self.bco_reward_mean.clone()

    def compute_loss(self, batch: PreferenceBatch) -> tuple[Tensor, dict[str, Tensor]]:
        h = self.hparams
        s = self.policy.score(batch, self.views)
        extra = {}
        if h.loss_type == "bco_pair" and h.get("bco_baseline", "running_mean") == "running_mean":
            extra["bco_delta"] = self._bco_delta(s)
        per_pair = dpo_loss(s.pair("chosen", "rejected"), beta=h.beta, loss_type=h.loss_type,
                            label_smoothing=h.label_smoothing, discopop_tau=h.discopop_tau, **extra)
        metrics = {"loss/dpo": per_pair.detach()}
        terms = {"dpo": per_pair.mean()}
        if h.nll_weight:  # DPO+NLL (RPO): a second term, weighted
            metrics["loss/nll"] = nll_loss(s.policy["chosen"], s.tokens["chosen"]).detach()
            terms["nll"] = reduce_nll(s.policy["chosen"], s.tokens["chosen"], h.get("nll_reduction", "sequence"))
        if "bco_delta" in extra:
            metrics["bco/delta"] = extra["bco_delta"]
        metrics.update(reward_metrics(s.rewards("chosen", h.beta), s.rewards("rejected", h.beta)))
        metrics.update(logps_metrics(s.policy))
        return combine(terms, {"nll": h.nll_weight} if "nll" in terms else {}), metrics
