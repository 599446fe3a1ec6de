"""What every preference LightningModule shares: the policy, the optimizer, the training-step checks and logging.

A family module only says which views of a pair it scores and how log-probs become a loss
(`compute_loss`). The processor is loaded at construction (cheap) so the CLI can hand it to the
DataModule; the model is built in `configure_model`, as FSDP and fast init want.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_meddpo.backbones.build import (
    AUTOCAST_DTYPES,
    LoraSettings,
    build_policy_model,
    dtype_name,
    store_frozen_in,
)
from lightning_meddpo.backbones.loader import load_processor
from lightning_meddpo.checkpoints import left_out_record, restore_left_out, restore_rng_state, rng_state
from lightning_meddpo.data.batch import PreferenceBatch
from lightning_meddpo.data.needs import PairNeeds
from lightning_meddpo.modules.generation import GenerationSteps
from lightning_meddpo.modules.guards import StepGuards
from lightning_meddpo.modules.settings import ModuleSettings
from lightning_meddpo.modules.wiring import default_callbacks, optimizers
from lightning_meddpo.policy import Mode, PreferencePolicy, ReferenceStrategy

log = logging.getLogger(__name__)


REFERENCE_PREFIX = "policy.reference."


def _drop_reference_keys(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: the `copy` reference equals the starting weights; do not save it."""
    for key in [k for k in state_dict if k.startswith(prefix + REFERENCE_PREFIX)]:
        del state_dict[key]


def _allow_missing_reference_keys(module, incompatible_keys) -> None:
    """load_state_dict post-hook: a checkpoint without the reference is complete (it is rebuilt)."""
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if REFERENCE_PREFIX not in k]


class PreferenceModule(StepGuards, GenerationSteps, L.LightningModule):
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
        save_frozen_weights: keep the policy's frozen weights (LoRA's base model, frozen parts) in checkpoints. By
            default they are left out (a 7B LoRA checkpoint: ~14 GB -> the adapters and their optimizer state) and
            taken from the model every load builds from `backbone` / `init_from`, after checking them against the
            digests the checkpoint keeps (checkpoints.restore_left_out): a changed backbone is an error. Kept
            under sharded strategies (FSDP / FSDP2), where each rank saves its shards.
        scoring: how views go through the model (policy.py): `packed` (default: the prompt forwarded
            once per image with both responses, images encoded once, LM head on responses only),
            `rows` (one row per view, same economies), `logits` (the model's own forward per view,
            TRL's way). All give the same log-probs; a model that cannot take one falls back, logged.
        logp_chunk: response tokens whose vocabulary logits exist at once (their float32 [tokens, vocab] is
            recomputed in the backward, not kept: memory does not grow with response length x vocabulary);
            null: all at once (a little faster where memory allows).

    The arguments stay flat YAML keys; `settings` reads them in typed groups (modules/settings.py). The NaN
    guard and input checks (guards.py), generation in test / predict (generation.py) and the optimizer and callbacks (wiring.py)
    are units of their own. Under ModelParallelStrategy (`configs/strategies/fsdp2.yaml`) `configure_model`
    shards the policy with FSDP2 (backbones/sharding.py).
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
        save_frozen_weights: bool = False,
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
        ModuleSettings.of(self.hparams, check=True)
        if not save_reference:
            self.register_state_dict_post_hook(_drop_reference_keys)
            self.register_load_state_dict_post_hook(_allow_missing_reference_keys)
        self._left_out_record: dict[str, list] | None = None  # digests of the left-out weights (frozen: computed once)
        self.processor = load_processor(backbone, chat_template=chat_template, trust_remote_code=trust_remote_code)
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.policy: PreferencePolicy | None = None
        self.eval_metrics = None  # built in setup for a `test` on questions (generation.py)

    @property
    def settings(self) -> ModuleSettings:
        return ModuleSettings.of(self.hparams)

    @property
    def reference_strategy(self) -> ReferenceStrategy:
        return self.settings.reference.strategy

    @property
    def frozen_parts(self) -> list[str]:
        return list(self.settings.model.freeze)

    def build_model(self) -> torch.nn.Module:
        """The policy model as configured (backbones/build.py builds it)."""
        m = self.settings.model
        return build_policy_model(m.backbone, init_from=m.init_from, lora=m.lora, freeze=list(m.freeze),
                                  gradient_checkpointing=m.gradient_checkpointing, trust_remote_code=m.trust_remote_code)

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        if self.hparams.lora is not None and self.hparams.reference == "copy":
            log.info("LoRA: the reference is the model with adapters disabled (reference='adapter')")
        scoring = self.settings.scoring
        self.policy = PreferencePolicy(self.build_model(), reference=self.reference_strategy, mode=scoring.mode,
                                       logp_chunk=scoring.logp_chunk)
        self.store_frozen_in_compute_dtype()
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 over the data-parallel mesh
            mesh = self.device_mesh["data_parallel"] if "data_parallel" in (self.device_mesh.mesh_dim_names or ()) else self.device_mesh
            self.policy.fully_shard(mesh)

    def store_frozen_in_compute_dtype(self) -> None:
        """Under bf16-mixed / 16-mixed, the frozen linear and convolution weights in the dtype autocast computes them
        in (backbones/build.store_frozen_in: the same forward, no per-step cast, a third of their memory): the
        policy's where that dtype holds them exactly, the `copy` reference's all (unless `save_reference`). Not under
        FSDPStrategy (FSDP1), which flattens a layer's parameters into one dtype and casts them itself."""
        from lightning.pytorch.strategies import FSDPStrategy

        trainer = self._trainer
        dtype = AUTOCAST_DTYPES.get(str(trainer.precision)) if trainer is not None else None
        if dtype is None or isinstance(trainer.strategy, FSDPStrategy):
            return
        done = store_frozen_in(self.policy.model, dtype)
        if self.policy.reference is not None:
            store_frozen_in(self.policy.reference, dtype, exact_only=bool(self.hparams.save_reference))
        name = dtype_name(dtype)
        log.info("frozen linear weights stored in %s: %d values", name, done.stored)
        if done.kept:
            log.warning("%d frozen weight values are not exact in %s (the backbone is saved in another dtype): kept in "
                        "float32, which autocast casts at every step (%.2f GiB more than stored in %s)", done.kept, name,
                        done.kept * 4 / 2**30, name)

    def left_out_weights(self) -> dict[str, Tensor]:
        """The policy's frozen weights checkpoints leave out, by state-dict key (tied weights under each name): none
        under `save_frozen_weights`, before the model is built, or where a strategy other than one device or DDP
        saves (FSDP's ranks each save shards, which would need a digest across ranks)."""
        from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

        strategy = self._trainer.strategy if self._trainer is not None else None
        whole = strategy is None or (isinstance(strategy, (SingleDeviceStrategy, DDPStrategy))
                                     and not isinstance(strategy, DeepSpeedStrategy))  # DeepSpeed saves the weights itself
        if self.hparams.get("save_frozen_weights") or self.policy is None or not whole:
            return {}
        return {f"policy.model.{name}": p for name, p in self.policy.model.named_parameters(remove_duplicate=False)
                if not p.requires_grad}

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
        left_out = self.left_out_weights() if isinstance(checkpoint.get("state_dict"), dict) else {}
        if left_out:  # the frozen weights equal the backbone's: the checkpoint keeps their digests only
            if self._left_out_record is None or self._left_out_record.keys() != left_out.keys():
                self._left_out_record = left_out_record(left_out)
            for key in left_out:
                checkpoint["state_dict"].pop(key, None)
            checkpoint["meddpo"]["left_out"] = self._left_out_record

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("meddpo") or {}
        if saved.get("rng"):
            restore_rng_state(saved["rng"])
        self._nonfinite_skipped = int(saved.get("nonfinite_skipped", 0))
        restore_left_out(checkpoint, self, getattr(self._trainer, "ckpt_path", None) or "the checkpoint")

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
        if stage == "train" and self.skip_nonfinite(bool(torch.isfinite(loss)), lambda: self.nonfinite_report(
                f"the training loss is {loss.item()}", batch.ids, metrics)):
            return None  # Lightning skips the backward and the optimizer step
        if not torch.isfinite(loss):
            raise FloatingPointError(self.nonfinite_report(f"the {stage} loss is {loss.item()}", batch.ids, metrics))
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

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def configure_callbacks(self):
        return default_callbacks(self)

    def configure_optimizers(self):
        return optimizers(self, self.optimizer_factory, self.scheduler_factory)
