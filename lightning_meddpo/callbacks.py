"""Lightning callbacks: resumable, atomic checkpoints, a clean stop on preemption, and throughput logging."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_meddpo.checkpoints import commit, temporary_sibling, writing
from lightning_meddpo.data.batch import PreferenceBatch

log = logging.getLogger(__name__)


class ResumableCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose last.ckpt is always the latest state, saved often enough, and never torn.

    - Lightning 2.6 rewrites last.ckpt only when a new top-k checkpoint is saved at that step, so a run
      whose validation stops improving ends with a stale last.ckpt; here it is written after every save
      point and at the end of training.
    - `last_every_n_steps` / `last_every_minutes`: last.ckpt is also written every N optimizer steps and/or
      every T minutes (whichever comes first), so a crash loses at most that much; the monitored best
      checkpoints are unaffected. At the end of an epoch or of the run (max_steps, a stop request) last.ckpt is
      written after the last batch, not in Lightning's epoch-end hooks, whose state Lightning 2.6 resumes wrongly
      (see on_train_batch_end): a resumed run, with a larger max_steps too, trains the pairs the uninterrupted
      run would.
    - Every save is atomic (checkpoints.py): written beside its final name, fsynced, then renamed, also for
      sharded (FSDP2) directories, so a kill during a save leaves the previous checkpoint whole; a save that
      fails (disk full) removes its partial file and stops the run with one line naming the path and cause.
    - One last.ckpt per directory: a run resumed from a checkpoint of its own directory writes last.ckpt again,
      even when a changed callback list or monitor keeps Lightning from restoring this callback's state (it
      would write last-v1.ckpt and leave last.ckpt stale).
    - `--ckpt_path last` (Lightning's search, outside our CLI) also looks in the run's other version
      directories; the CLI resolves `last` itself and refuses a run trained with other settings.
    - The "could not find the monitored key" warning is given only once validation has logged something
      (a short run that stops before its first validation is not misconfigured).

    Args:
        last_every_n_steps: write last.ckpt every this many optimizer steps (None: only at save points).
        last_every_minutes: write last.ckpt when this many minutes passed since the last save (None: off).
    """

    def __init__(self, *args, last_every_n_steps: int | None = None, last_every_minutes: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if last_every_n_steps is not None and last_every_n_steps < 1:
            raise ValueError(f"last_every_n_steps must be >= 1, got {last_every_n_steps}")
        self.last_every_n_steps = last_every_n_steps
        self.last_every_minutes = last_every_minutes
        self._last_saved_at = time.monotonic()
        self._last_written_step: int | None = None  # the global step last.ckpt was last written at
        self._at_epoch_end = False  # inside on_train_epoch_end / on_train_end

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        path = Path(filepath)
        tmp = temporary_sibling(path)
        with writing(path, "the checkpoint", partial=tmp):  # a full disk: one line, no partial file left
            super()._save_checkpoint(trainer, str(tmp))
            trainer.strategy.barrier("atomic_checkpoint")
            if trainer.is_global_zero and tmp.exists():
                commit(tmp, path)
        trainer.strategy.barrier("atomic_checkpoint_done")
        self._last_checkpoint_saved = filepath
        self._last_saved_at = time.monotonic()

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        """A run resumed from a checkpoint in this directory continues its last.ckpt, whether or not Lightning
        restored this callback's state (it does not when the callback's settings, e.g. its monitor, changed):
        otherwise the newest state would go to last-v1.ckpt beside a stale last.ckpt. At the end of an epoch or
        run, the state written after the last batch is kept (see on_train_batch_end)."""
        if self._at_epoch_end and self._last_written_step == trainer.global_step:
            return  # never over this step's mid-epoch state (see on_train_batch_end)
        if self._resumed_here(trainer):
            self.last_model_path = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_written_step = trainer.global_step

    def _resumed_here(self, trainer: L.Trainer) -> bool:
        resumed = trainer.ckpt_path
        return bool(resumed and self.dirpath) and Path(resumed).resolve().parent == Path(self.dirpath).resolve()

    def _save_last_if_behind(self, trainer: L.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        due = self.last_every_n_steps is not None and trainer.global_step % self.last_every_n_steps == 0
        if self.last_every_minutes is not None:
            due = due or trainer.strategy.broadcast(time.monotonic() - self._last_saved_at >= 60 * self.last_every_minutes)
        if due:
            self._save_last_if_behind(trainer)
        elif self._epoch_or_run_ends(trainer):
            # Written after the batch, not at the end of the epoch or the run: a checkpoint written there says
            # "epoch ended" in a way Lightning 2.6 resumes wrongly (one batch of the next epoch, then the one after;
            # the rest of that epoch's pairs never trained). Not counted as this step's save, so the top-k
            # checkpoint of a validation that follows is still written (and last.ckpt again, still mid-epoch).
            counted = self._last_global_step_saved
            self._save_last_if_behind(trainer)
            self._last_global_step_saved = counted

    @staticmethod
    def _epoch_or_run_ends(trainer: L.Trainer) -> bool:
        """This batch is the epoch's last, or the run stops after it (max_steps reached, a stop request)."""
        return (trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or trainer.should_stop
                or 0 <= trainer.max_steps <= trainer.global_step)

    # Lightning saves either at train-epoch end or at validation end (never both); follow it, after
    # its own top-k save, so last.ckpt never pre-empts the best checkpoint of the same step.
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._at_epoch_end = True  # last.ckpt of this step was written after its batch (see on_train_batch_end)
        try:
            super().on_train_epoch_end(trainer, pl_module)
            if self._should_save_on_train_epoch_end(trainer):
                self._save_last_if_behind(trainer)
        finally:
            self._at_epoch_end = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._at_epoch_end = True
        try:
            super().on_train_end(trainer, pl_module)
            self._save_last_if_behind(trainer)
        finally:
            self._at_epoch_end = False

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        if self.monitor is not None and self.monitor not in monitor_candidates and \
                not any(str(k).startswith("val/") for k in monitor_candidates):
            return  # no validation has run yet: nothing to rank, nothing misconfigured
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        found = super()._find_last_checkpoints(trainer)
        if self.dirpath is None and trainer.loggers and trainer.loggers[0].save_dir:
            root = Path(trainer.loggers[0].save_dir) / str(trainer.loggers[0].name)
            found |= {str(p) for p in root.glob("*/checkpoints/last*.ckpt")}
        return found


class Preemption(L.Callback):
    """A job told to stop (SIGUSR1: `#SBATCH --signal=USR1@120` has Slurm send it to the job's tasks 120 s before
    the time limit; SIGTERM: preemption, scancel) finishes the step in flight, writes last.ckpt atomically (ResumableCheckpoint
    saves when a run stops), asks Slurm to requeue it (`scontrol requeue $SLURM_JOB_ID`, under Slurm) and exits 0;
    the requeued job's `fit ... --ckpt_path last` then resumes bit-identically.

    Ours rather than Lightning's auto-requeue, which writes an hpc_ckpt_N.ckpt from inside the signal handler, in the
    middle of a step, beside the run (not atomic, not last.ckpt): here the handler only sets a flag, and every rank
    agrees on it at the end of a step. Lightning's SIGTERM handling (an exception at the next batch) is replaced
    while training, so the job ends cleanly.

    Args:
        signals: the signals that stop and requeue the run.
        requeue: call `scontrol requeue` when the run stopped on a signal under Slurm (SLURM_JOB_ID set).
    """

    def __init__(self, signals: list[str] | None = None, requeue: bool = True):
        self.signals = [getattr(signal, name) for name in (signals or ["SIGUSR1", "SIGTERM"])]
        self.requeue = requeue
        self.received: int | None = None
        self.stopped = False
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handler)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        received = self.received is not None
        if trainer.world_size > 1:
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if received and not self.stopped:
            name = signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
            log.warning("%s received: stopping after step %d, saving last.ckpt%s", name, trainer.global_step,
                        " and requeueing the job" if self._slurm_job() and self.requeue else "")
            self.stopped = trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        job = self._slurm_job()
        if self.stopped and self.requeue and job and trainer.is_global_zero:
            try:
                result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            except OSError as e:
                log.warning("cannot requeue job %s (%s): resume it with --ckpt_path last", job, e)
                return
            if result.returncode != 0:
                log.warning("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())

    @staticmethod
    def _slurm_job() -> str | None:
        array = os.environ.get("SLURM_ARRAY_JOB_ID")
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID")


class Throughput(L.Callback):
    """Logs train/pairs_per_sec and train/tokens_per_sec: the tokens of each pair's chosen and rejected
    sequences (prompt + response, padding excluded), however the policy packs them.

    Ours rather than Lightning's ThroughputMonitor: that one needs the model's FLOPs to say more than
    samples per second, and counts a batch's length as one number, where a pair has two sequences sharing
    a prompt (and m' views); this reads the count from the batch itself (`PreferenceBatch.sequence_tokens`)."""

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
