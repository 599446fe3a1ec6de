"""A step that would train on NaN / inf never does; a run whose gradient stays exactly 0 says so; a pair scored on
an m' it lacks is an error naming it.

A mixin of PreferenceModule: Lightning calls `on_before_optimizer_step`; the module's step calls
`skip_nonfinite` for the loss. Every rank decides together (a skip on one rank only would desynchronise them).
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import Tensor

from lightning_meddpo.data.batch import PreferenceBatch

log = logging.getLogger(__name__)

ZERO_GRAD_PATIENCE = 20  # steps of an exactly-zero gradient norm before the run warns that nothing trains


class StepGuards:
    _nonfinite_skipped = 0
    _zero_grad_steps = 0
    _batch_ids: list[str] = []

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.policy.model.parameters() if p.grad is not None]
        if not grads:
            self._warn_if_nothing_trains(0.0)
            return
        norm = torch.nn.utils.get_total_norm(grads)
        if hasattr(norm, "full_tensor"):  # sharded (FSDP2 DTensor) gradients
            norm = norm.full_tensor()
        if self.skip_nonfinite(bool(torch.isfinite(norm)), lambda: self.nonfinite_report(
                f"the gradient norm is {norm.item()}", self._batch_ids, {})):
            for p in self.policy.model.parameters():
                p.grad = None  # the optimizer leaves parameters without a gradient as they are
            return
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False, batch_size=1)
        self._warn_if_nothing_trains(float(norm))

    def skip_nonfinite(self, finite: bool, report) -> bool:
        """False if every rank's value is finite. Else stop with `report()` (nonfinite: stop), or count
        the step and return True so the caller skips it on every rank (nonfinite: skip)."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        bad = strategy.reduce_boolean_decision(not finite, all=False) if strategy is not None else not finite
        if not bad:
            return False
        if self.settings.optimizer.nonfinite == "stop":
            raise FloatingPointError(report() + " (set model.init_args.nonfinite=skip to skip such steps and count them)")
        self._nonfinite_skipped += 1
        log.warning("skipped: %s", report())
        self.log("train/nonfinite_skipped", float(self._nonfinite_skipped), on_step=True, on_epoch=False, batch_size=1)
        return True

    def nonfinite_report(self, what: str, ids: list[str], metrics: dict[str, Tensor]) -> str:
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
