"""Training step time, throughput and peak memory of one formulation (any fit config).

    python benchmarks/step_time.py --config configs/formulations/dpo.yaml --config configs/backbones/demo.yaml --steps 40
    python benchmarks/step_time.py --config configs/formulations/mdpo.yaml --config configs/backbones/demo.yaml -- --trainer.precision=bf16-mixed
    python benchmarks/step_time.py --config configs/formulations/dpo.yaml --config configs/backbones/llava_med.yaml --config configs/strategies/fsdp.yaml \\
        -- --model.init_args.backbone=llava-med-hf --data.init_args.train_file=pairs.json

Runs `fit` in-process through the project's LightningCLI for `--steps` optimizer steps, without
validation, logs and checkpoints going to a temporary directory, and prints one JSON line: the
median seconds per step after `--warmup` steps, pairs and tokens per second (chosen and rejected,
padding excluded), and peak memory (CUDA max allocated on a GPU, else the process's max RSS).
Arguments after `--` go to the CLI. Under a multi-process strategy every rank prints its own line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_meddpo.cli import TRAINER_DEFAULTS, MedDPOCLI  # noqa: E402
from lightning_meddpo.modules.base import PreferenceModule  # noqa: E402


class StepTimer(L.Callback):
    """Wall time, pairs and tokens of every training step (CUDA synchronised at both ends)."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, int, int]] = []
        self._start = 0.0

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = self._now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        tokens = batch.sequence_tokens()
        self.steps.append((self._now() - self._start, len(batch), tokens))


def peak_memory_mib() -> tuple[float, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"  # KiB on Linux


def fit_script_parser(description: str, argv: list[str] | None) -> tuple[argparse.ArgumentParser, list[str], list[str]]:
    """A fit script's parser with its repeatable --config, its own arguments and the CLI's (those after `--`)."""
    argv = sys.argv[1:] if argv is None else argv
    cli_extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", action="append", required=True, help="fit config (repeatable, like the CLI)")
    return p, own, cli_extra


def main(argv: list[str] | None = None) -> dict:
    p, own, cli_extra = fit_script_parser(__doc__.split("\n\n")[0], argv)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps to run")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    args = p.parse_args(own)
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    out = Path(tempfile.mkdtemp(prefix="step_time-"))
    cli_args = [a for c in args.config for a in ("--config", c)] + [
        f"--trainer.max_steps={args.steps}", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
        f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.enable_progress_bar=false", *cli_extra,
    ]
    cli = MedDPOCLI(PreferenceModule, None, subclass_mode_model=True, subclass_mode_data=True,
                    trainer_defaults=TRAINER_DEFAULTS, args=cli_args, run=False, auto_configure_optimizers=False,
                    save_config_callback=None)
    timer = StepTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    timed = timer.steps[args.warmup :]
    seconds = sum(s for s, _, _ in timed)
    memory, memory_kind = peak_memory_mib()
    result = {
        "config": args.config, "cli_args": cli_extra, "rank": cli.trainer.global_rank, "steps_timed": len(timed),
        "seconds_per_step_median": statistics.median(s for s, _, _ in timed),
        "pairs_per_second": sum(n for _, n, _ in timed) / seconds,
        "tokens_per_second": sum(t for _, _, t in timed) / seconds,
        f"peak_memory_mib_{memory_kind}": round(memory, 1),
        "precision": str(cli.trainer.precision), "strategy": type(cli.trainer.strategy).__name__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}",
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
