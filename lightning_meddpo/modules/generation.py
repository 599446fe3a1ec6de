"""Generation-based evaluation inside a preference module: `test` and `predict` on questions (an EvalBatch from
eval.datamodule.EvalDataModule) generate answers and score them (eval/generate.py does the work); `test` on
preference pairs stays the preference metrics. A mixin of PreferenceModule."""

from __future__ import annotations

from lightning_meddpo.data.batch import PreferenceBatch


class GenerationSteps:
    """Its module sets `eval_metrics = None` in __init__ (a class attribute would hide the nn.Module it becomes)."""

    def test_step(self, batch, batch_idx: int):
        """Preference pairs: the preference metrics (test/loss, test/rewards/...). An EvalBatch: generate answers,
        update the VQA/report metrics, return the rows the PredictionWriter writes."""
        if isinstance(batch, PreferenceBatch):
            return self._step(batch, "test")
        return self._eval_step(batch, update_metrics=True)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        """Generate answers for an EvalBatch; returns one row per question (written by PredictionWriter)."""
        if isinstance(batch, PreferenceBatch):
            raise TypeError("predict generates answers: use lightning_meddpo.eval.datamodule.EvalDataModule as the data")
        return self._eval_step(batch, update_metrics=False)

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
