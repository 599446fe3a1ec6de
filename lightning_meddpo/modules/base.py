"""What every preference LightningModule shares: the policy, the optimizer, the training-step checks and logging.

A family module only says which views of a pair it scores and how log-probs become a loss
(`compute_loss`). The processor is loaded at construction (cheap) so the CLI can hand it to the
DataModule; the model is built in `configure_model`, as FSDP and fast init want.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from lightning_meddpo.backbones.adapter import FREEZABLE
from lightning_meddpo.backbones.build import LoraSettings, build_policy_model
from lightning_meddpo.backbones.loader import load_processor
from lightning_meddpo.checkpoints import restore_rng_state, rng_state
from lightning_meddpo.data.batch import PreferenceBatch
from lightning_meddpo.data.needs import PairNeeds
from lightning_meddpo.policy import Mode, PreferencePolicy, ReferenceStrategy

log = logging.getLogger(__name__)


REFERENCE_PREFIX = "policy.reference."
LR_LOGGING = {"interval": "step", "name": "train/lr"}  # stepped per optimizer step; LearningRateMonitor's key
ZERO_GRAD_PATIENCE = 20  # steps of an exactly-zero gradient norm before the run warns that nothing trains


def _drop_reference_keys(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: the `copy` reference equals the starting weights; do not save it."""
    for key in [k for k in state_dict if k.startswith(prefix + REFERENCE_PREFIX)]:
        del state_dict[key]


def _allow_missing_reference_keys(module, incompatible_keys) -> None:
    """load_state_dict post-hook: a checkpoint without the reference is complete (it is rebuilt)."""
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if REFERENCE_PREFIX not in k]


def check_choice(family: str, key: str, value: str, known) -> None:
    """Every family chooses its objective by one name from its own table (DPO: losses.DPO_LOSS_TYPES by
    `loss_type`; ReferenceFree and Multimodal: their OBJECTIVES by `loss`), checked at construction."""
    if value not in known:
        raise ValueError(f"{family}: unknown {key} {value!r}; use one of {sorted(known)}")


def check_beta(beta: float) -> None:
    """The implicit-reward temperature must be positive: at 0 the preference terms have no gradient, and
    below 0 they learn the reverse preference while the logged reward accuracy still rises."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta} (0 trains nothing; < 0 learns the rejected answers)")


class PreferenceModule(L.LightningModule):
    """Base for all families.

    Args:
        backbone: HF directory, hub id, or `tiny://llama|mistral|qwen2` (the offline demo model).
        reference: `copy` (frozen copy), `adapter` (LoRA disabled), `precomputed` (the starting model's
            log-probs computed once before the first step and cached on disk, see modules/precomputed.py:
            no reference model in memory), `none` (reference-free).
        reference_cache_dir: where precomputed reference log-probs are cached (default: the tool's cache,
            $LIGHTNING_MEDDPO_CACHE or ~/.cache/lightning_meddpo, under reference_logps/).
        init_from: start from an earlier run: a Lightning .ckpt or an HF model directory.
        chat_template: one of ours by name (see backbones/templates.py); default: the checkpoint's.
        lr, weight_decay, warmup_ratio: AdamW, linear warmup over warmup_ratio of the steps, then `lr_schedule`.
        lr_schedule: "cosine" to 0 (the paper's: LLaVA's --lr_scheduler_type cosine), "linear" to 0 (the
            transformers Trainer's and so TRL's default) or "constant".
        optimizer: another torch optimizer in place of AdamW, given as LightningCLI gives one
            (`optimizer: {class_path: torch.optim.SGD, init_args: {momentum: 0.9}}`). `lr` and `weight_decay`
            stay the one place for those two and are set on it; its init_args set the rest.
        lr_scheduler: another torch scheduler (stepped every optimizer step) in place of warmup + `lr_schedule`.
        nonfinite: a NaN/inf training loss or gradient "stop"s the run with the step, the batch's record ids
            and the loss terms, or is skipped on every rank ("skip": no update; counted, logged as
            train/nonfinite_skipped). Never trained on.
        lora: train LoRA adapters instead of all weights (`lora: {r, alpha, dropout, target_modules}`);
            the reference is then the model with adapters disabled (`copy` is switched to `adapter`).
        trust_remote_code: let `from_pretrained` run code from the checkpoint (off by default).
        freeze: parts kept frozen: any of `vision_tower`, `projector`, `language_model`
            (LLaVA: vision_tower / multi_modal_projector / language_model + lm_head; Qwen-VL:
            visual without its merger / visual.merger / language_model + lm_head).
        freeze_vision_tower, freeze_projector: deprecated booleans for the same (a warning says so); they
            still work, so saved configs and checkpoints load.
        gradient_checkpointing: recompute activations in the backward (non-reentrant checkpointing).
        save_reference: keep the `copy` reference in checkpoints. By default it is left out (it would
            double the checkpoint) and rebuilt from `backbone` / `init_from` on load: it equals the
            starting weights.
        scoring: how views go through the model (policy.py): `packed` (default: the prompt forwarded
            once per image with both responses, images encoded once, LM head on responses only),
            `rows` (one row per view, same economies), `logits` (the model's own forward per view,
            TRL's way). All give the same log-probs; a model that cannot take one falls back, logged.
        logp_chunk: response tokens whose vocabulary logits exist at once (their float32 [tokens, vocab] is
            recomputed in the backward, not kept: memory does not grow with response length x vocabulary);
            null: all at once (a little faster where memory allows).

    Scale: under Lightning's ModelParallelStrategy (`configs/strategies/fsdp2.yaml`) `configure_model`
    applies FSDP2 `fully_shard` to every decoder layer and vision encoder layer, then to the model
    root; the `copy` reference is sharded the same way.
    """

    views: tuple[str, ...] = ("chosen", "rejected")
    accepts_unpaired: bool = False  # unpaired (KTO-format) batches: only KTO can use them

    @property
    def pair_needs(self) -> PairNeeds:
        """What this formulation needs from each pair (data/needs.py): the DataModule checks every record
        against it before step 1, and processes m' only where it is scored."""
        return PairNeeds(self.formulation_name, signal="text", mprime="never")

    @property
    def formulation_name(self) -> str:
        return type(self).__name__

    @property
    def reference_views(self) -> tuple[str, ...]:
        """The views whose reference log-probs the loss reads (what `reference: precomputed` computes)."""
        return self.views

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
        freeze: list[str] | None = None,
        freeze_vision_tower: bool = False,
        freeze_projector: bool = False,
        gradient_checkpointing: bool = False,
        save_reference: bool = False,
        scoring: Mode = "packed",
        reference_cache_dir: str | None = None,
        lr_schedule: Literal["cosine", "linear", "constant"] = "cosine",
        nonfinite: Literal["stop", "skip"] = "stop",
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        logp_chunk: int | None = 1024,
    ):
        super().__init__()
        self.save_hyperparameters()
        unknown = set(freeze or ()) - set(FREEZABLE)
        if unknown:
            raise ValueError(f"freeze: unknown part(s) {sorted(unknown)}; known: {list(FREEZABLE)}")
        for flag, part, on in (("freeze_vision_tower", "vision_tower", freeze_vision_tower),
                               ("freeze_projector", "projector", freeze_projector)):
            if on:
                warnings.warn(f"{flag}: true is deprecated; write freeze: [{part}] (the one freeze setting)",
                              DeprecationWarning, stacklevel=2)
        if not save_reference:
            self.register_state_dict_post_hook(_drop_reference_keys)
            self.register_load_state_dict_post_hook(_allow_missing_reference_keys)
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr} (at lr 0 nothing trains)")
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        self.processor = load_processor(backbone, chat_template=chat_template, trust_remote_code=trust_remote_code)
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.policy: PreferencePolicy | None = None
        self._nonfinite_skipped = 0
        self._zero_grad_steps = 0
        self._batch_ids: list[str] = []
        self.eval_metrics = None  # built in setup for a `test` on questions

    @property
    def reference_strategy(self) -> ReferenceStrategy:
        if self.hparams.lora is not None and self.hparams.reference == "copy":
            return "adapter"
        return self.hparams.reference

    @property
    def frozen_parts(self) -> list[str]:
        h = self.hparams
        parts = list(h.freeze or [])
        parts += [p for p, on in (("vision_tower", h.freeze_vision_tower), ("projector", h.freeze_projector)) if on and p not in parts]
        return parts

    def build_model(self) -> torch.nn.Module:
        """The policy model as configured (backbones/build.py builds it)."""
        h = self.hparams
        return build_policy_model(h.backbone, init_from=h.init_from, lora=h.lora, freeze=self.frozen_parts,
                                  gradient_checkpointing=h.gradient_checkpointing, trust_remote_code=h.trust_remote_code)

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        if self.hparams.lora is not None and self.hparams.reference == "copy":
            log.info("LoRA: the reference is the model with adapters disabled (reference='adapter')")
        self.policy = PreferencePolicy(self.build_model(), reference=self.reference_strategy, mode=self.hparams.scoring,
                                       logp_chunk=self.hparams.logp_chunk)
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 over the data-parallel mesh
            mesh = self.device_mesh["data_parallel"] if "data_parallel" in (self.device_mesh.mesh_dim_names or ()) else self.device_mesh
            self.policy.fully_shard(mesh)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        hparams = checkpoint.get("hyper_parameters")
        if hparams is not None and isinstance(hparams.get("lora"), LoraSettings):
            hparams["lora"] = asdict(hparams["lora"])  # a plain dict: checkpoints load with weights_only=True
        for key in ("optimizer", "lr_scheduler"):  # callables do not load with weights_only (under LightningCLI
            if hparams is not None and callable(hparams.get(key)):  # they are saved as their config, a dict)
                hparams[key] = None
        checkpoint["meddpo"] = {
            "module_class": f"{type(self).__module__}.{type(self).__qualname__}",
            "reference_saved": bool(self.hparams.save_reference) and self.reference_strategy == "copy",
            "rng": rng_state(),  # a resumed run continues every generator where it stopped
            "nonfinite_skipped": self._nonfinite_skipped,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("meddpo") or {}
        if saved.get("rng"):
            restore_rng_state(saved["rng"])
        self._nonfinite_skipped = int(saved.get("nonfinite_skipped", 0))

    @staticmethod
    def require_mprime(batch: PreferenceBatch, needed: Tensor | None = None) -> None:
        """Every pair that an image-side term scores on m' (all, or where `needed`) must have a real m',
        not the stand-in m a mixed batch carries (which would train nothing at loss log 2)."""
        has = batch.has_mprime if batch.rejected_images is not None else torch.zeros(len(batch), dtype=torch.bool)
        has = torch.ones(len(batch), dtype=torch.bool) if has is None else has.cpu()
        missing = ~has if needed is None else needed.cpu() & ~has
        if bool(missing.any()):
            names = [batch.ids[i] for i in missing.nonzero().flatten().tolist()]
            raise ValueError(f"records {names[:8]} have no corrupted image m' (rejected_image), which this "
                             "formulation scores: give them a rejected_image or set data.corruption")

    # -- the family's part -------------------------------------------------------------------
    def compute_loss(self, batch: PreferenceBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """(scalar loss, metrics to log) for a batch."""
        raise NotImplementedError

    # -- Lightning hooks -----------------------------------------------------------------------
    def _step(self, batch: PreferenceBatch, stage: str) -> Tensor:
        if batch.desirable is not None and not self.accepts_unpaired:
            raise ValueError(f"records {batch.ids[:4]}... are unpaired (KTO format: completion + label); "
                             f"{type(self).__name__} needs preference pairs (use lightning_meddpo.modules.KTO)")
        loss, metrics = self.compute_loss(batch)
        if stage == "train" and self._skip_nonfinite(bool(torch.isfinite(loss)), lambda: self._nonfinite_report(
                f"the training loss is {loss.item()}", batch.ids, metrics)):
            return None  # Lightning skips the backward and the optimizer step
        if not torch.isfinite(loss):
            raise FloatingPointError(self._nonfinite_report(f"the {stage} loss is {loss.item()}", batch.ids, metrics))
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(batch))
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value.float().mean(), on_step=on_step, on_epoch=True, sync_dist=True, batch_size=len(batch))
        return loss

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        """Our batches move their tensors themselves: Lightning's generic walk deep-copies a dataclass
        batch (every tensor, pixels included) before moving it, on every step."""
        if isinstance(batch, PreferenceBatch):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor | None:
        self._batch_ids = batch.ids
        return self._step(batch, "train")

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.policy.model.parameters() if p.grad is not None]
        if not grads:
            self._warn_if_nothing_trains(0.0)
            return
        norm = torch.nn.utils.get_total_norm(grads)
        if hasattr(norm, "full_tensor"):  # sharded (FSDP2 DTensor) gradients
            norm = norm.full_tensor()
        if self._skip_nonfinite(bool(torch.isfinite(norm)), lambda: self._nonfinite_report(
                f"the gradient norm is {norm.item()}", self._batch_ids, {})):
            for p in self.policy.model.parameters():
                p.grad = None  # the optimizer leaves parameters without a gradient as they are
            return
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False, batch_size=1)
        self._warn_if_nothing_trains(float(norm))

    # -- a step that would train on NaN / inf never does --------------------------------------------
    def _skip_nonfinite(self, finite: bool, report) -> bool:
        """False if every rank's value is finite. Else stop with `report()` (nonfinite: stop), or count
        the step and return True so the caller skips it on every rank (nonfinite: skip)."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        bad = strategy.reduce_boolean_decision(not finite, all=False) if strategy is not None else not finite
        if not bad:
            return False
        if self.hparams.get("nonfinite", "stop") == "stop":
            raise FloatingPointError(report() + " (set model.init_args.nonfinite=skip to skip such steps and count them)")
        self._nonfinite_skipped += 1
        log.warning("skipped: %s", report())
        self.log("train/nonfinite_skipped", float(self._nonfinite_skipped), on_step=True, on_epoch=False, batch_size=1)
        return True

    def _nonfinite_report(self, what: str, ids: list[str], metrics: dict[str, Tensor]) -> str:
        terms = ", ".join(f"{k}={v.float().mean().item():.4g}" for k, v in metrics.items() if k.startswith("loss/"))
        step = self._trainer.global_step if self._trainer is not None else "?"
        return f"{what} at step {step} on records {list(ids)}" + (f" (terms: {terms})" if terms else "")

    def _warn_if_nothing_trains(self, norm: float) -> None:
        """A gradient norm of exactly 0 step after step: nothing is learning (all frozen, no signal)."""
        self._zero_grad_steps = self._zero_grad_steps + 1 if norm == 0.0 else 0
        if self._zero_grad_steps == ZERO_GRAD_PATIENCE:
            warnings.warn(f"the gradient norm has been exactly 0 for {ZERO_GRAD_PATIENCE} steps (step "
                          f"{self.global_step}): nothing is training. Are all parts frozen, or do the pairs carry no "
                          "preference signal for this formulation?", stacklevel=2)

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
    def setup(self, stage: str) -> None:
        """`test` on questions (not preference pairs): the generation metrics, with the data's judge setting."""
        self.eval_metrics = None
        if stage == "test":
            from lightning_meddpo.eval.generate import EvalMetrics

            dm = self.trainer.datamodule
            if not hasattr(dm, "reference_dataloaders"):  # not a PreferenceDataModule
                self.eval_metrics = EvalMetrics(judge=getattr(dm, "judge", None))

    def _eval_step(self, batch, update_metrics: bool) -> list[dict]:
        from lightning_meddpo.eval.generate import EvalBatch, generate

        if not isinstance(batch, EvalBatch):
            raise TypeError(f"expected a PreferenceBatch or an EvalBatch, got {type(batch).__name__}")
        predictions = self.policy.through_root(self.policy.model, generate, self.policy.model, self.processor, batch)
        if update_metrics:
            self.eval_metrics.update(batch, predictions)
        return batch.rows(predictions)

    def on_test_epoch_end(self) -> None:
        metrics = self.eval_metrics
        if metrics is None:
            return
        for name, value in metrics.compute().items():  # already reduced across ranks by torchmetrics
            self.log(f"test/{name}", value, on_epoch=True)
        metrics.reset()

    def configure_callbacks(self):
        """A PredictionWriter (predictions.jsonl in the run's log dir), PrecomputedReference for `reference:
        precomputed`, and with a logger Lightning's LearningRateMonitor (the lr as `train/lr`, every logged
        step), unless the trainer has them configured."""
        from lightning.pytorch.callbacks import LearningRateMonitor

        from lightning_meddpo.eval.generate import PredictionWriter
        from lightning_meddpo.modules.precomputed import PrecomputedReference

        wanted = [PredictionWriter()]
        if self.reference_strategy == "precomputed":
            wanted.append(PrecomputedReference())
        if self.trainer.loggers:
            wanted.append(LearningRateMonitor(logging_interval="step"))
        return [c for c in wanted if not any(isinstance(have, type(c)) for have in self.trainer.callbacks)]

    def configure_optimizers(self):
        """AdamW + linear warmup and `lr_schedule` (the default), or the configured optimizer / scheduler."""
        h = self.hparams
        params = [p for p in self.policy.model.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(params, lr=h.lr, weight_decay=h.weight_decay)
        else:
            optimizer = self.optimizer_factory(params)
            for group in optimizer.param_groups:  # lr and weight_decay: one place for them, ours
                group["lr"] = h.lr
                if "weight_decay" in group:
                    group["weight_decay"] = h.weight_decay
        if self.scheduler_factory is not None:
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), **LR_LOGGING}}
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(h.warmup_ratio * total)
        schedule = h.get("lr_schedule", "cosine")
        if schedule == "cosine":
            scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
        elif schedule == "linear":
            scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
        elif schedule == "constant":
            scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
        else:
            raise ValueError(f"lr_schedule must be cosine, linear or constant, got {schedule!r}")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, **LR_LOGGING}}
