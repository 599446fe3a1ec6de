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
        logps = self.policy.logps(batch, self.views)
        tokens = self.policy.tokens(batch, self.views)
        loss = reduce_nll(logps["chosen"], tokens["chosen"], self.hparams.nll_reduction)
        chosen_norm = (logps["chosen"] / tokens["chosen"].clamp(min=1)).detach()
        rejected_norm = (logps["rejected"] / tokens["rejected"].clamp(min=1)).detach()
        return loss, {
            "logps/chosen": logps["chosen"].detach(),
            "logps/rejected": logps["rejected"].detach(),
            "rewards/accuracies": (chosen_norm > rejected_norm).float(),
            "rewards/margins": chosen_norm - rejected_norm,
        }
