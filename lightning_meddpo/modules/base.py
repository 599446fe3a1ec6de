"""What every preference LightningModule shares: backbone loading, the policy, optimizer and logging.

A family module only says which views of a pair it scores and how log-probs become a loss
(`compute_loss`). The processor is loaded at construction (cheap) so the CLI can hand it to the
DataModule; the model is built in `configure_model`, as FSDP and fast init want.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from transformers import get_cosine_schedule_with_warmup

from lightning_meddpo.backbones.loader import load_model, load_processor
from lightning_meddpo.data.batch import PreferenceBatch
from lightning_meddpo.policy import PreferencePolicy, ReferenceStrategy

log = logging.getLogger(__name__)


@dataclass
class LoraSettings:
    """peft LoRA settings; with LoRA the reference is the model with adapters disabled."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


def load_policy_weights(model: torch.nn.Module, ckpt_path: str) -> None:
    """Load the policy weights of a Lightning checkpoint (e.g. an SFT run) into `model`."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    prefix = "policy.model."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"{ckpt_path}: no '{prefix}*' weights in this checkpoint")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt_path}: does not match the backbone: missing {missing[:5]}, unexpected {unexpected[:5]}")


class PreferenceModule(L.LightningModule):
    """Base for all families.

    Args:
        backbone: HF directory, hub id, or `tiny://llama|mistral|qwen2` (the offline demo model).
        reference: `copy` (frozen copy), `adapter` (LoRA disabled), `none` (reference-free).
        init_from: start from an earlier run: a Lightning .ckpt or an HF model directory.
        chat_template: one of ours by name (see backbones/templates.py); default: the checkpoint's.
        lr, weight_decay, warmup_ratio: AdamW with a cosine schedule after linear warmup.
        lora: train LoRA adapters instead of all weights.
    """

    views: tuple[str, ...] = ("chosen", "rejected")

    def __init__(
        self,
        backbone: str = "tiny://llama",
        reference: ReferenceStrategy = "copy",
        init_from: str | None = None,
        chat_template: str | None = None,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        lora: LoraSettings | None = None,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.processor = load_processor(backbone, chat_template=chat_template, trust_remote_code=trust_remote_code)
        self.policy: PreferencePolicy | None = None

    @property
    def reference_strategy(self) -> ReferenceStrategy:
        return self.hparams.reference

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        h = self.hparams
        source = h.init_from if h.init_from and Path(h.init_from).is_dir() else h.backbone
        model = load_model(source, trust_remote_code=h.trust_remote_code)
        if h.init_from and not Path(h.init_from).is_dir():
            load_policy_weights(model, h.init_from)
        if h.lora is not None:
            from peft import LoraConfig, get_peft_model

            lora = h.lora if isinstance(h.lora, LoraSettings) else LoraSettings(**h.lora)
            model = get_peft_model(
                model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules)
            )
        self.policy = PreferencePolicy(model, reference=self.reference_strategy)

    # -- the family's part -------------------------------------------------------------------
    def compute_loss(self, batch: PreferenceBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """(scalar loss, metrics to log) for a batch."""
        raise NotImplementedError

    # -- Lightning hooks -----------------------------------------------------------------------
    def _step(self, batch: PreferenceBatch, stage: str) -> Tensor:
        loss, metrics = self.compute_loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{stage} loss is {loss.item()} on records {batch.ids}")
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(batch))
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value.float().mean(), on_step=on_step, on_epoch=True, sync_dist=True, batch_size=len(batch))
        return loss

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return self._step(batch, "train")

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.policy.model.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            if hasattr(norm, "full_tensor"):  # sharded (FSDP2 DTensor) gradients
                norm = norm.full_tensor()
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch, batch_idx: int):
        """Preference pairs: the preference metrics (test/loss, test/rewards/...). An EvalBatch (from
        eval.datamodule.EvalDataModule): generate answers, update the VQA/report metrics, return the rows
        the PredictionWriter writes."""
        if isinstance(batch, PreferenceBatch):
            return self._step(batch, "test")
        return self._eval_step(batch, update_metrics=True)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        """Generate answers for an EvalBatch; returns one row per question (written by PredictionWriter)."""
        if isinstance(batch, PreferenceBatch):
            raise TypeError("predict generates answers: use lightning_meddpo.eval.datamodule.EvalDataModule as the data")
        return self._eval_step(batch, update_metrics=False)

    # -- generation-based evaluation (eval/generate.py does the work) --------------------------
    def _eval_step(self, batch, update_metrics: bool) -> list[dict]:
        from lightning_meddpo.eval.generate import EvalBatch, EvalMetrics, generate

        if not isinstance(batch, EvalBatch):
            raise TypeError(f"expected a PreferenceBatch or an EvalBatch, got {type(batch).__name__}")
        predictions = generate(self.policy.model, self.processor, batch)
        if update_metrics:
            if getattr(self, "eval_metrics", None) is None:
                self.eval_metrics = EvalMetrics(judge=batch.judge).to(self.device)
            self.eval_metrics.update(batch, predictions)
        return batch.rows(predictions)

    def on_test_epoch_end(self) -> None:
        metrics = getattr(self, "eval_metrics", None)
        if metrics is None:
            return
        for name, value in metrics.compute().items():  # already reduced across ranks by torchmetrics
            self.log(f"test/{name}", value, on_epoch=True)
        metrics.reset()

    def configure_callbacks(self):
        """A PredictionWriter (predictions.jsonl in the run's log dir) unless the trainer has one configured."""
        from lightning_meddpo.eval.generate import PredictionWriter

        if any(isinstance(c, PredictionWriter) for c in self.trainer.callbacks):
            return []
        return [PredictionWriter()]

    def configure_optimizers(self):
        params = [p for p in self.policy.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = get_cosine_schedule_with_warmup(optimizer, int(self.hparams.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
