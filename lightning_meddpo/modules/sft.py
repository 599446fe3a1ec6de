"""SFT: supervised fine-tuning on the chosen response, the paper's baseline."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from lightning_meddpo.data.batch import PreferenceBatch
from lightning_meddpo.data.needs import PairNeeds
from lightning_meddpo.losses import reduce_nll
from lightning_meddpo.modules.base import PreferenceModule


class SFT(PreferenceModule):
    """Length-normalised NLL of the chosen response. No reference model.

    The rejected response is scored too (same forward) so SFT runs log the same preference
    accuracy as DPO runs: how often the model prefers chosen to rejected, per token.

    Args:
        nll_reduction: "sequence" (the mean of per-sequence per-token means: the paper's SFT baseline) or
            "token" (the mean over all chosen tokens of the batch: TRL's `sft` loss type).
    """

    def __init__(self, *, reference: str = "none", nll_reduction: Literal["sequence", "token"] = "sequence", **kwargs):
        super().__init__(reference=reference, **kwargs)
        self.save_hyperparameters()

    @property
    def pair_needs(self) -> PairNeeds:
        return PairNeeds("SFT", signal="none", mprime="never")  # learns the chosen answer only

    def compute_loss(self, batch: PreferenceBatch) -> tuple[Tensor, dict[str, Tensor]]:
        s = self.policy.score(batch, self.views, reference=False)
        loss = reduce_nll(s.policy["chosen"], s.tokens["chosen"], self.hparams.nll_reduction)
        chosen_norm, rejected_norm = s.mean_logp("chosen").detach(), s.mean_logp("rejected").detach()
        return loss, {
            "logps/chosen": s.policy["chosen"].detach(),
            "logps/rejected": s.policy["rejected"].detach(),
            "rewards/accuracies": (chosen_norm > rejected_norm).float(),
            "rewards/margins": chosen_norm - rejected_norm,
        }
