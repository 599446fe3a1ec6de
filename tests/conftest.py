"""Shared fixtures: offline environment, a small demo dataset, the tiny backbone, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_meddpo.demo  # noqa: F401  (registers tiny:// and the demo data, as the command line does)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _hermetic_cache(tmp_path_factory):
    """Tiny backbones are built into a per-session cache, never read from the user's."""
    os.environ["LIGHTNING_MEDDPO_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A small synthetic demo dataset (48 train / 16 val / 16 test pairs)."""
    from lightning_meddpo.demo.synthetic import generate_demo_dataset

    out = tmp_path_factory.mktemp("demo")
    generate_demo_dataset(out, n_train=48, n_val=16, n_test=16, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_processor():
    from lightning_meddpo.backbones.loader import load_processor

    return load_processor("tiny://llama")


@pytest.fixture(scope="session")
def bf16_backbone(tmp_path_factory) -> Path:
    """The tiny backbone saved in bfloat16, as published 7B backbones are."""
    import torch

    from lightning_meddpo.backbones.loader import load_model, load_processor

    out = tmp_path_factory.mktemp("bf16_backbone")
    load_model("tiny://llama").to(torch.bfloat16).save_pretrained(out)
    load_processor("tiny://llama").save_pretrained(out)
    return out


def image_token_count(processor) -> int:
    """Image tokens the tiny LLaVA processor expands `<image>` into: (image side / patch side)^2."""
    return (processor.image_processor.crop_size["height"] // processor.patch_size) ** 2


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m lightning_meddpo ARGS` as a subprocess; fail with its output if it fails."""
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_meddpo", *args],
        cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if proc.returncode != 0:
        pytest.fail(f"CLI {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_program(name: str, argv: list[str]):
    """`python -m lightning_meddpo NAME ARGV` in this process, through the CLI's own parser and dispatch:
    the program's result (e.g. build-pairs' BuildSummary)."""
    from lightning_meddpo.cli import main

    return main([name, *argv]).result


def small_demo_args(demo_dir: Path, root: Path) -> list[str]:
    """CLI overrides: the small demo data, logs and checkpoints under `root`, no progress bar."""
    return [
        f"--data.init_args.train_file={demo_dir / 'train.json'}",
        f"--data.init_args.val_file={demo_dir / 'val.json'}",
        f"--data.init_args.test_file={demo_dir / 'test.json'}",
        "--data.init_args.demo=false",
        f"--trainer.logger.init_args.save_dir={root}",
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
    ]
