"""KTO on unpaired examples or on preference pairs, with the mismatched-pair KL baseline.

Unpaired data (format "kto": prompt, completion, label): each example is desirable or undesirable
by its label; the loss is the mean over the batch's examples. Paired data -> unpaired: each pair
gives two examples, its chosen response as a desirable one and its rejected response as an
undesirable one (same prompt and image); the loss is the mean over the 2B examples (as TRL, which
concatenates the two groups).

KL baseline z_0 (as published and as TRL does it): completions scored against the wrong prompt.
Here the chosen response (or the completion) of row i is scored against the prompt AND image of
row i+1 (the batch rolled by one), under the policy and the reference, without gradient;
z_0 = max(0, mean(logp_theta - logp_ref)), the mean taken over all ranks. With a batch of one row
the "mismatched" row is the row itself (use batch_size >= 2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_meddpo.data.batch import EncodedImages, EncodedText, PreferenceBatch, pad_stack
from lightning_meddpo.data.collate import IGNORE_INDEX
from lightning_meddpo.losses import kto_kl_baseline, kto_loss, rewards
from lightning_meddpo.modules.base import PreferenceModule
from lightning_meddpo.modules.dpo import global_mean, logps_metrics, reward_metrics


def mismatched_text(text: EncodedText, shift: int = 1) -> EncodedText:
    """Row i = the prompt of row (i+shift) % B followed by the response of row i.

    The prompt is the leading unlabelled part of a row (with its image tokens), the response the
    labelled tokens; per-token extras (e.g. mm_token_type_ids) are spliced the same way. A row longer
    than the batch's padded width loses the end of its response (so it never exceeds max_length).
    """
    lengths = text.attention_mask.sum(-1)
    labelled = text.labels != IGNORE_INDEX
    prompt_len = torch.where(labelled.any(-1), labelled.int().argmax(-1), lengths)
    rows: dict[str, list[Tensor]] = {"input_ids": [], "labels": [], **{k: [] for k in text.extra}}
    batch, limit = text.input_ids.shape
    for i in range(batch):
        j = (i + shift) % batch
        p, r0, r1 = int(prompt_len[j]), int(prompt_len[i]), int(lengths[i])
        response = text.input_ids[i, r0:r1]
        pieces = {
            "input_ids": (text.input_ids[j, :p], response),
            "labels": (torch.full((p,), IGNORE_INDEX, dtype=text.labels.dtype, device=text.labels.device), text.labels[i, r0:r1]),
            **{k: (v[j, :p], v[i, r0:r1]) for k, v in text.extra.items()},
        }
        for key, (a, b) in pieces.items():
            rows[key].append(torch.cat([a, b])[:limit])
    input_ids = pad_stack(rows["input_ids"], 0).to(text.input_ids.device)
    return EncodedText(
        input_ids=input_ids,
        attention_mask=pad_stack([torch.ones_like(r) for r in rows["input_ids"]], 0).to(input_ids.device),
        labels=pad_stack(rows["labels"], IGNORE_INDEX).to(input_ids.device),
        extra={k: pad_stack(rows[k], 0).to(input_ids.device) for k in text.extra},
    )


def rolled_images(images: EncodedImages, shift: int = 1) -> EncodedImages:
    """Image i = image (i+shift) % B. Flattened-patch processors (Qwen2-VL: `image_grid_thw`) are
    split per image by their patch counts first."""
    if "image_grid_thw" in images.extra:
        grid = images.extra["image_grid_thw"]
        chunks = list(images.pixel_values.split(grid.prod(-1).tolist()))
        order = [(i + shift) % len(chunks) for i in range(len(chunks))]
        extra = {k: v[order] for k, v in images.extra.items()}
        return EncodedImages(torch.cat([chunks[i] for i in order]), extra)
    return EncodedImages(
        images.pixel_values.roll(-shift, 0), {k: v.roll(-shift, 0) for k, v in images.extra.items()}
    )


def mismatched_batch(batch: PreferenceBatch, shift: int = 1) -> PreferenceBatch:
    """A batch whose "chosen" view is chosen response i on the prompt and image of pair i+shift."""
    text = mismatched_text(batch.chosen, shift)
    ids = [f"{batch.ids[i]}|{batch.ids[(i + shift) % len(batch)]}" for i in range(len(batch))]
    return PreferenceBatch(ids=ids, chosen=text, rejected=text, images=rolled_images(batch.images, shift))


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
        super().__init__(**kwargs)
        self.save_hyperparameters()

    @torch.no_grad()
    def kl_baseline(self, batch: PreferenceBatch) -> Tensor:
        """z_0 from mismatched pairs (chosen i on prompt/image i+1), averaged over ranks, clamped at 0."""
        kl_batch = mismatched_batch(batch)
        policy = self.policy.logps(kl_batch, ("chosen",))["chosen"]
        reference = self.policy.reference_logps(kl_batch, ("chosen",))["chosen"]
        return kto_kl_baseline(global_mean(self, policy.mean()).reshape(1), global_mean(self, reference.mean()).reshape(1))

    def compute_loss(self, batch: PreferenceBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if batch.desirable is not None:
            return self.unpaired_loss(batch)
        h = self.hparams
        logps = self.policy.logps(batch, self.views)
        ref = self.policy.reference_logps(batch, self.views)
        z0 = self.kl_baseline(batch)
        policy = torch.cat([logps["chosen"], logps["rejected"]])
        reference = torch.cat([ref["chosen"], ref["rejected"]])
        desirable = torch.arange(len(policy), device=policy.device) < len(batch)
        per_example = kto_loss(
            policy, reference, desirable, z0,
            beta=h.beta, desirable_weight=h.desirable_weight, undesirable_weight=h.undesirable_weight,
        )
        metrics = {"loss/kto": per_example.detach(), "kl": z0}
        metrics.update(reward_metrics(
            rewards(logps["chosen"], ref["chosen"], h.beta), rewards(logps["rejected"], ref["rejected"], h.beta)
        ))
        metrics.update(logps_metrics(logps))
        return per_example.mean(), metrics

    def unpaired_loss(self, batch: PreferenceBatch) -> tuple[Tensor, dict[str, Tensor]]:
        h, desirable = self.hparams, batch.desirable
        policy = self.policy.logps(batch, ("chosen",))["chosen"]
        reference = self.policy.reference_logps(batch, ("chosen",))["chosen"]
        z0 = self.kl_baseline(batch)
        per_example = kto_loss(policy, reference, desirable, z0, beta=h.beta,
                               desirable_weight=h.desirable_weight, undesirable_weight=h.undesirable_weight)
        reward = rewards(policy, reference, h.beta).detach()
        signed = torch.where(desirable, 1.0, -1.0) * (reward - h.beta * z0)
        metrics = {"loss/kto": per_example.detach(), "kl": z0, "rewards/margins": signed,
                   "rewards/accuracies": (signed > 0).float(), "logps/chosen": policy.detach()}
        for name, mask in (("rewards/chosen", desirable), ("rewards/rejected", ~desirable)):
            count = global_mean(self, mask.sum().float())
            if count > 0:  # the same on every rank, so every rank logs the same keys
                metrics[name] = global_mean(self, (reward * mask).sum()) / count
        return per_example.mean(), metrics
