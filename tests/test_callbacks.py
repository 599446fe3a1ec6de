"""ResumableCheckpoint: last.ckpt is always the final state; `last` is found across versions."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_meddpo.callbacks import ResumableCheckpoint


class NeverImproves(L.LightningModule):
    """A linear model whose validation score only gets worse, so top-k saves only after epoch 0."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("score", -float(self.current_epoch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, callback, epochs=3, ckpt_path=None, val_check_interval=1.0):
    data = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)
    trainer = L.Trainer(
        max_epochs=epochs, callbacks=[callback], logger=TensorBoardLogger(tmp_path, name="run"),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        val_check_interval=val_check_interval,
    )
    trainer.fit(NeverImproves(), data, data, ckpt_path=ckpt_path)
    return trainer


def test_last_checkpoint_is_the_final_state_even_when_val_stops_improving(tmp_path):
    plain = ModelCheckpoint(monitor="score", mode="max", save_last=True)
    _fit(tmp_path / "plain", plain)
    assert torch.load(plain.last_model_path, weights_only=False)["global_step"] == 2  # Lightning's stale last

    for val_check_interval in (1.0, 2):  # Lightning saves at train-epoch end, or at validation end
        ours = ResumableCheckpoint(monitor="score", mode="max", save_last=True)
        trainer = _fit(tmp_path / f"ours{val_check_interval}", ours, val_check_interval=val_check_interval)
        assert torch.load(ours.last_model_path, weights_only=False)["global_step"] == trainer.global_step == 6
        assert torch.load(ours.best_model_path, weights_only=False)["global_step"] == 2  # top-k still saved


def test_ckpt_path_last_finds_the_previous_version(tmp_path):
    _fit(tmp_path, ResumableCheckpoint(monitor="score", mode="max", save_last=True), epochs=2)
    trainer = _fit(tmp_path, ResumableCheckpoint(monitor="score", mode="max", save_last=True), epochs=3, ckpt_path="last")
    assert trainer.logger.version == 1 and trainer.global_step == 6  # resumed at step 4, ran one more epoch
    steps = torch.load(tmp_path / "run" / "version_1" / "checkpoints" / "last.ckpt", weights_only=False)
    assert steps["global_step"] == 6 and steps["epoch"] == 2
