"""`plan`'s prediction against the measured peak of real training steps, on the CPU or a GPU.

    python benchmarks/plan_accuracy.py --config configs/formulations/dpo.yaml --config configs/backbones/demo.yaml
    python benchmarks/plan_accuracy.py --config configs/formulations/dpo.yaml --config configs/backbones/demo.yaml \\
        -- --model.init_args.backbone=/tmp/model-100m --data.init_args.batch_size=4

Runs `fit` in-process through the project's CLI for `--steps` steps. During the last step a dispatch mode
(LiveTensorBytes: every tensor storage an op creates, until it is freed, the way CUDA's allocator counts them, on
any device) measures the peak of live tensor memory; the same step's batch becomes the plan's Workload and the run's
settings its Settings (lightning_meddpo.plan.settings_of). Prints one JSON line: both figures and their ratio.
"""

from __future__ import annotations

import json
import sys
import tempfile
import weakref
from pathlib import Path

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_meddpo.cli import TRAINER_DEFAULTS, MedDPOCLI  # noqa: E402
from lightning_meddpo.modules.base import PreferenceModule  # noqa: E402
from lightning_meddpo.plan import GIB, Planner, settings_of, workload_of  # noqa: E402


class LiveTensorBytes(TorchDispatchMode):
    """The peak of live tensor memory while active, counted as CUDA's allocator counts it: every storage an op
    creates is added when it appears and taken off when it is freed, and a storage resized in place (FSDP2 frees
    and refills its unsharded parameters that way) counts its new size. `resident`: the storages already alive."""

    def __init__(self, resident: list[torch.UntypedStorage]) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}  # id(storage) -> bytes; a storage's Python object lives as long as it does
        for storage in resident:
            self._track(storage)
        self.peak = self.live

    @property
    def live(self) -> int:
        return sum(self.sizes.values())

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key not in self.sizes:
            self.sizes[key] = storage.nbytes()
            weakref.finalize(storage, self.sizes.pop, key, None)

    def _resized(self, storage: torch.UntypedStorage) -> None:
        if id(storage) in self.sizes:
            self.sizes[id(storage)] = storage.nbytes()
        else:
            self._track(storage)
        self.peak = max(self.peak, self.live)

    def __enter__(self):
        original = self._original_resize = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage, size):
            result = original(storage, size)
            tracker._resized(storage)
            return result

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._original_resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and id(t.untyped_storage()) not in self.sizes:
                self._track(t.untyped_storage())
                self.peak = max(self.peak, self.live)
        return out


def resident_storages(module: torch.nn.Module, optimizers) -> list[torch.UntypedStorage]:
    """The module's weights and buffers, their gradients and the optimizers' states (FSDP2: this rank's shards)."""
    tensors = [*module.parameters(), *module.buffers(), *(p.grad for p in module.parameters() if p.grad is not None)]
    for optimizer in optimizers:
        tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return [(t.to_local() if hasattr(t, "to_local") else t).untyped_storage() for t in tensors]


class MeasureStep(L.Callback):
    """The peak tensor memory of step `step` (forward, backward and optimizer step). The previous step's gradients
    live through the forward: Lightning zeroes them between the forward and the backward."""

    def __init__(self, step: int) -> None:
        self.step, self.tracker, self.peak, self.batch = step, None, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.batch = batch
            self.tracker = LiveTensorBytes(resident_storages(pl_module, trainer.optimizers))
            self.tracker.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.tracker is not None and self.peak is None:
            self.tracker.__exit__(None, None, None)
            self.peak = self.tracker.peak


def measure(configs: list[str], cli_extra: list[str], steps: int = 2) -> dict:
    out = Path(tempfile.mkdtemp(prefix="plan_accuracy-"))
    cli_args = [a for c in configs for a in ("--config", c)] + [
        f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
        f"--trainer.default_root_dir={out}", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
        "--trainer.callbacks=[]", "--trainer.enable_progress_bar=false", *cli_extra,
    ]
    cli = MedDPOCLI(PreferenceModule, None, subclass_mode_model=True, subclass_mode_data=True,
                    trainer_defaults=TRAINER_DEFAULTS, args=cli_args, run=False, auto_configure_optimizers=False,
                    save_config_callback=None)
    probe = MeasureStep(steps - 1)
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    module = cli.model
    views = module.views_for(probe.batch) if hasattr(module, "views_for") else module.views
    workload = workload_of(probe.batch, views, packed=module.policy.mode_for(module.policy.model) == "packed")
    planner = Planner(module.policy.model.config, settings_of(module, cli.trainer))
    plan = planner.plan(workload)
    return {"measured_peak_mib": round(probe.peak / 2**20, 2), "planned_peak_mib": round(plan.peak / 2**20, 2),
            "ratio": round(plan.peak / probe.peak, 3), "workload": vars(workload),
            "plan_gib": {k: round(v / GIB, 4) for k, v in plan.as_dict().items() if isinstance(v, int)},
            "settings": {k: str(v) for k, v in vars(planner.settings).items()}}


def main(argv: list[str] | None = None) -> dict:
    from step_time import fit_script_parser

    p, own, cli_extra = fit_script_parser(__doc__.split("\n\n")[0], argv)
    p.add_argument("--steps", type=int, default=2, help="steps to run; the last one is measured")
    args = p.parse_args(own)
    result = measure(args.config, cli_extra, args.steps)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
