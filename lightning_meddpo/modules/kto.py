"""KTO on unpaired examples or on preference pairs, with the mismatched-pair KL baseline.

Unpaired data (format "kto": prompt, completion, label): each example is desirable or undesirable
by its label; the loss is the mean over the batch's examples. Paired data -> unpaired: each pair
gives two examples, its chosen response as a desirable one and its rejected response as an
undesirable one (same prompt and image); the loss is the mean over the 2B examples (as TRL, which
concatenates the two groups).

KL baseline z_0 (as published and as TRL does it): completions scored against the wrong prompt.
Here the chosen response (or the completion) of row i is scored against the prompt AND image of
row i+1 (`PreferenceBatch.mismatched`), under the policy and the reference, without gradient;
z_0 = max(0, mean(logp_theta - logp_ref)), the mean taken over all ranks. With a batch of one row
the "mismatched" row is the row itself (use batch_size >= 2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_meddpo.data.batch import PreferenceBatch
from lightning_meddpo.losses import kto_kl_baseline, kto_loss
from lightning_meddpo.modules.base import PreferenceModule
from lightning_meddpo.modules.dpo import global_mean, logps_metrics, reward_metrics
from lightning_meddpo.modules.settings import check_beta


class KTO(PreferenceModule):
    """KTO (Ethayarajh et al. 2024) on unpaired examples, or on pairs split into desirable (chosen)
    and undesirable (rejected).

    Args:
        beta: temperature of the implicit reward.
        desirable_weight, undesirable_weight: KTO's lambda_D, lambda_U (the paper advises
            desirable_weight * n_D / (undesirable_weight * n_U) in [1, 4/3]; paired data has n_D = n_U).

    Logged on unpaired batches: `rewards/chosen` and `rewards/rejected` are the mean reward beta*h of
    the desirable and of the undesirable examples (over all ranks; left out when there are none),
    `rewards/accuracies` the share of examples on their label's side of the KL baseline
    (h > z_0 for desirable, h < z_0 for undesirable), `rewards/margins` beta*(h - z_0) signed by the
    label (positive = right side).
    """

    accepts_unpaired = True

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0, **kwargs):
        if kwargs.get("reference") == "precomputed":
            raise ValueError("KTO cannot use reference: precomputed: its KL baseline scores completions on other rows' "
                             "prompts, which change with every shuffle; use reference: copy (or LoRA's adapter)")
        check_beta(beta)
        super().__init__(**kwargs)
        self.save_hyperparameters()

    @torch.no_grad()
    def kl_baseline(self, batch: PreferenceBatch) -> Tensor:
        """z_0 from mismatched pairs (chosen i on prompt/image i+1), averaged over ranks, clamped at 0."""
        kl_batch = batch.mismatched(1)
        policy = self.policy.logps(kl_batch, ("chosen",))["chosen"]
        reference = self.policy.reference_logps(kl_batch, ("chosen",))["chosen"]
        return kto_kl_baseline(global_mean(self, policy.mean()).reshape(1), global_mean(self, reference.mean()).reshape(1))

    def compute_loss(self, batch: PreferenceBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if batch.desirable is not None:
            return self.unpaired_loss(batch)
        h = self.hparams
        s = self.policy.score(batch, self.views)
        z0 = self.kl_baseline(batch)
        policy = torch.cat([s.policy["chosen"], s.policy["rejected"]])
        reference = torch.cat([s.reference["chosen"], s.reference["rejected"]])
        desirable = torch.arange(len(policy), device=policy.device) < len(batch)
        per_example = kto_loss(
            policy, reference, desirable, z0,
            beta=h.beta, desirable_weight=h.desirable_weight, undesirable_weight=h.undesirable_weight,
        )
        metrics = {"loss/kto": per_example.detach(), "kl": z0}
        metrics.update(reward_metrics(s.rewards("chosen", h.beta), s.rewards("rejected", h.beta)))
        metrics.update(logps_metrics(s.policy))
        return per_example.mean(), metrics

    def unpaired_loss(self, batch: PreferenceBatch) -> tuple[Tensor, dict[str, Tensor]]:
        h, desirable = self.hparams, batch.desirable
        s = self.policy.score(batch, ("chosen",))
        policy, reference = s.policy["chosen"], s.reference["chosen"]
        z0 = self.kl_baseline(batch)
        per_example = kto_loss(policy, reference, desirable, z0, beta=h.beta,
                               desirable_weight=h.desirable_weight, undesirable_weight=h.undesirable_weight)
        reward = s.rewards("chosen", h.beta)
        signed = torch.where(desirable, 1.0, -1.0) * (reward - h.beta * z0)
        metrics = {"loss/kto": per_example.detach(), "kl": z0, "rewards/margins": signed,
                   "rewards/accuracies": (signed > 0).float(), "logps/chosen": policy.detach()}
        for name, mask in (("rewards/chosen", desirable), ("rewards/rejected", ~desirable)):
            count = global_mean(self, mask.sum().float())
            if count > 0:  # the same on every rank, so every rank logs the same keys
                metrics[name] = global_mean(self, (reward * mask).sum()) / count
        return per_example.mean(), metrics
