"""Lightning callbacks: resumable checkpoints and throughput logging."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_meddpo.data.batch import PreferenceBatch


class ResumableCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose last.ckpt is always the latest state, and is found again on resume.

    Lightning 2.6 rewrites last.ckpt only when a new top-k checkpoint is saved at that step, so a run
    whose validation stops improving ends with a stale last.ckpt; here it is written after every
    save point and at the end of training. And `--ckpt_path last` searches every version of the run
    (logger save_dir/name), where Lightning only looks in the new run's own version directory.
    """

    def _save_last_if_behind(self, trainer: L.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # Lightning saves either at train-epoch end or at validation end (never both); follow it, after
    # its own top-k save, so last.ckpt never pre-empts the best checkpoint of the same step.
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_last_if_behind(trainer)

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        found = super()._find_last_checkpoints(trainer)
        if self.dirpath is None and trainer.loggers and trainer.loggers[0].save_dir:
            root = Path(trainer.loggers[0].save_dir) / str(trainer.loggers[0].name)
            found |= {str(p) for p in root.glob("*/checkpoints/last*.ckpt")}
        return found


class Throughput(L.Callback):
    """Logs train/pairs_per_sec and train/tokens_per_sec: the tokens of each pair's chosen and rejected
    sequences (prompt + response, padding excluded), however the policy packs them."""

    def __init__(self) -> None:
        self._start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch: PreferenceBatch, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: PreferenceBatch, batch_idx: int) -> None:
        if self._start is None:
            return
        seconds = max(time.perf_counter() - self._start, 1e-9)
        tokens = batch.sequence_tokens()
        pl_module.log("train/pairs_per_sec", len(batch) / seconds, on_step=True, on_epoch=False, batch_size=len(batch))
        pl_module.log("train/tokens_per_sec", tokens / seconds, on_step=True, on_epoch=False, batch_size=len(batch))
