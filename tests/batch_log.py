"""A callback for subprocess tests: appends each training batch's (global step, epoch, record ids) to a JSONL file."""

from __future__ import annotations

import json

import lightning as L


class BatchLog(L.Callback):
    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps([trainer.global_step, trainer.current_epoch, list(batch.ids)]) + "\n")
