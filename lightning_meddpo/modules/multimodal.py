"""Image-conditional preference: CoPO, mDPO (DPO + CoPO + anchor) and the paper's targeted mix.

All image-side terms are computed from log-probs really scored under the corrupted image m'
(view "chosen_mprime"); m' comes from the record's rejected_image or the DataModule's corruption.
(The paper's released mDPO re-ran its text term instead; this does not.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_meddpo.data.batch import PreferenceBatch
from lightning_meddpo.data.needs import PairNeeds
from lightning_meddpo.losses import Scores, anchor_loss, combine, copo_loss, dpo_loss
from lightning_meddpo.modules.base import PreferenceModule
from lightning_meddpo.modules.dpo import (
    image_reward_metrics,
    logps_metrics,
    reward_metrics,
)
from lightning_meddpo.modules.settings import check_beta, check_choice, renamed_key


class Multimodal(PreferenceModule):
    """Preference terms on the image: the same chosen answer should be likelier under m than under m'.

    Args:
        loss_type: the formulation (`loss`, its former name, still loads with a warning).
            "copo": -log sigma(beta (h(y_w,m) - h(y_w,m'))) alone;
            "mdpo": dpo_weight * DPO + copo_weight * CoPO + anchor_weight * anchor, each term computed
            separately and combined with `losses.combine`;
            "targeted": the paper's mix: each pair is a text-rejected pair (DPO term, on m) or an
            image-rejected pair (CoPO term, y_w on m vs on m'), as `batch.image_rejected` says.
        beta: temperature of the implicit reward (all terms).
        dpo_weight, copo_weight, anchor_weight: term weights (mdpo; targeted uses dpo/copo weights).
        delta: the anchor's threshold, -log sigma(beta h(y_w,m) - delta) (mDPO uses 0).

    Logged: `loss/<term>` per term (for targeted, each term's contribution to the loss: zero on pairs
    of the other kind, so loss/dpo + loss/copo = loss); `rewards/*`: for mdpo the text pair
    (y_w vs y_l on m); for copo the image pair (y_w on m vs on m'); for targeted each pair's own
    rejected side (y_l on m, or y_w on m'). `rewards_img/*` (copo, mdpo): beta h(y_w,m) vs
    beta h(y_w,m'), how much the preferred answer depends on the true image.
    """

    def __init__(
        self,
        loss_type: str = "mdpo",
        beta: float = 0.1,
        dpo_weight: float = 1.0,
        copo_weight: float = 1.0,
        anchor_weight: float = 1.0,
        delta: float = 0.0,
        loss: str | None = None,
        **kwargs,
    ):
        loss_type = renamed_key("Multimodal", "loss", loss, "loss_type", loss_type, "mdpo")
        loss = None  # saved as loss_type only
        check_choice("Multimodal", "loss_type", loss_type, FORMULATIONS)
        check_beta(beta)
        super().__init__(**kwargs)
        self.save_hyperparameters()

    @property
    def pair_needs(self) -> PairNeeds:
        loss = self.hparams.loss_type
        if loss == "copo":
            return PairNeeds("CoPO", signal="image", mprime="always")
        if loss == "mdpo":
            return PairNeeds("mDPO", signal="either", mprime="always")
        return PairNeeds("the targeted mix", signal="pair_type", mprime="image_pairs")

    @property
    def reference_views(self) -> tuple[str, ...]:
        if self.hparams.loss_type == "copo":
            return ("chosen", "chosen_mprime")
        return ("chosen", "rejected", "chosen_mprime")

    def views_for(self, batch: PreferenceBatch) -> tuple[str, ...]:
        """The views this loss needs for this batch ("chosen_mprime" only for image-side terms)."""
        loss = self.hparams.loss_type
        if loss == "copo":
            return ("chosen", "chosen_mprime")
        if loss == "mdpo":
            return ("chosen", "rejected", "chosen_mprime")
        image_pairs = _image_rejected(batch)
        views = ("chosen",)
        if not bool(image_pairs.all()):
            views += ("rejected",)
        if bool(image_pairs.any()):
            views += ("chosen_mprime",)
        return views

    def compute_loss(self, batch: PreferenceBatch) -> tuple[Tensor, dict[str, Tensor]]:
        h = self.hparams
        self.require_mprime(batch, _image_rejected(batch) if h.loss_type == "targeted" else None)
        per_pair, metrics = FORMULATIONS[h.loss_type](batch, self.policy.score(batch, self.views_for(batch)), h)
        return per_pair.mean(), metrics


def copo(batch: PreferenceBatch, s: Scores, h) -> tuple[Tensor, dict[str, Tensor]]:
    """CoPO alone; `rewards/*` is the image pair (y_w on m vs on m')."""
    term = copo_loss(s.pair("chosen", "chosen_mprime"), beta=h.beta)
    on_m, on_mprime = s.rewards("chosen", h.beta), s.rewards("chosen_mprime", h.beta)
    metrics = {"loss/copo": term.detach(), **logps_metrics(s.policy)}
    metrics.update(reward_metrics(on_m, on_mprime))
    metrics.update(image_reward_metrics(on_m, on_mprime))
    return combine({"copo": term}, {"copo": h.copo_weight}), metrics


def mdpo(batch: PreferenceBatch, s: Scores, h) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO + CoPO + anchor, each computed on its own and weighted; `rewards/*` is the text pair."""
    terms = {
        "dpo": dpo_loss(s.pair("chosen", "rejected"), beta=h.beta),
        "copo": copo_loss(s.pair("chosen", "chosen_mprime"), beta=h.beta),
        "anchor": anchor_loss(s.policy["chosen"], s.reference["chosen"], beta=h.beta, delta=h.delta),
    }
    reward = {view: s.rewards(view, h.beta) for view in ("chosen", "rejected", "chosen_mprime")}
    metrics = logps_metrics(s.policy)
    metrics.update(reward_metrics(reward["chosen"], reward["rejected"]))
    metrics.update({f"loss/{name}": value.detach() for name, value in terms.items()})
    metrics.update(image_reward_metrics(reward["chosen"], reward["chosen_mprime"]))
    return combine(terms, {"dpo": h.dpo_weight, "copo": h.copo_weight, "anchor": h.anchor_weight}), metrics


def targeted(batch: PreferenceBatch, s: Scores, h) -> tuple[Tensor, dict[str, Tensor]]:
    """Per pair: DPO (text-rejected) or CoPO (image-rejected). The logged keys do not depend on the batch's
    mix (ranks must log the same keys); `*/rejected` is each pair's rejected side."""
    p = s.policy
    image_pairs = _image_rejected(batch).to(p["chosen"].device)
    zeros = torch.zeros_like(p["chosen"])
    dpo = copo = zeros
    if "rejected" in p:
        dpo = dpo_loss(s.pair("chosen", "rejected"), beta=h.beta)
    if "chosen_mprime" in p:
        copo = copo_loss(s.pair("chosen", "chosen_mprime"), beta=h.beta)
    terms = {"dpo": torch.where(image_pairs, zeros, dpo), "copo": torch.where(image_pairs, copo, zeros)}
    reward = {view: s.rewards(view, h.beta) for view in p}
    rejected_side = torch.where(image_pairs, reward.get("chosen_mprime", zeros), reward.get("rejected", zeros))
    metrics = {f"loss/{name}": value.detach() for name, value in terms.items()}
    metrics.update(reward_metrics(reward["chosen"], rejected_side))
    metrics["logps/chosen"] = p["chosen"].detach()
    metrics["logps/rejected"] = torch.where(image_pairs, p.get("chosen_mprime", zeros), p.get("rejected", zeros)).detach()
    metrics["pairs/image_rejected"] = image_pairs.float()
    return combine(terms, {"dpo": h.dpo_weight, "copo": h.copo_weight}), metrics


FORMULATIONS = {"copo": copo, "mdpo": mdpo, "targeted": targeted}  # each: (batch, scores, hparams) -> (per pair, metrics)


def _image_rejected(batch: PreferenceBatch) -> Tensor:
    if batch.image_rejected is None:
        raise ValueError(f"the targeted loss needs `image_rejected` per pair (records {batch.ids[:4]}...)")
    return batch.image_rejected.bool()
