"""MMedPO: clinical-relevance-weighted DPO with the hallucinated answer on the noised image rejected."""

from __future__ import annotations

from torch import Tensor

from lightning_meddpo.data.batch import PreferenceBatch
from lightning_meddpo.data.needs import PairNeeds
from lightning_meddpo.losses import mmedpo_loss
from lightning_meddpo.modules.base import PreferenceModule
from lightning_meddpo.modules.dpo import logps_metrics, reward_metrics
from lightning_meddpo.modules.settings import check_beta


class MMedPO(PreferenceModule):
    """w_i * -log sigma(beta (h(y_w, m) - h(y_l, m'))), w_i = the record's `weighted_score`.

    The rejected side is the rejected (hallucinated) text scored under the noised image m' (view
    "rejected_mprime"), as the paper's released MMedPO does. A batch without weights is an error
    naming its records, never a silent fall-back to plain DPO. The loss is the batch mean of the
    weighted per-pair losses.

    Args:
        beta: temperature of the implicit reward.
    """

    views = ("chosen", "rejected_mprime")

    def __init__(self, beta: float = 0.1, **kwargs):
        check_beta(beta)
        super().__init__(**kwargs)
        self.save_hyperparameters()

    @property
    def pair_needs(self) -> PairNeeds:
        return PairNeeds("MMedPO", signal="either", mprime="always", weight=True)  # y_w on m against y_l on m'

    def compute_loss(self, batch: PreferenceBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if batch.weights is None:
            raise ValueError(
                f"MMedPO needs a clinical-relevance weight (`weighted_score`) for every record; "
                f"at least one of the records {batch.ids} has none"
            )
        self.require_mprime(batch)
        beta = self.hparams.beta
        s = self.policy.score(batch, self.views)
        weights = batch.weights.to(s.policy["chosen"].device)
        per_pair = mmedpo_loss(s.pair("chosen", "rejected_mprime"), weights, beta=beta)
        metrics = {"loss/mmedpo": per_pair.detach(), "weights": weights}
        metrics.update(reward_metrics(s.rewards("chosen", beta), s.rewards("rejected_mprime", beta)))
        metrics.update(logps_metrics(s.policy))
        return per_pair.mean(), metrics
