"""The benchmark runner on a 2-formulation (SFT, DPO), few-step grid: fits and tests as CLI subprocesses,
summary table and plots, skipping of finished runs, and the demo grid's config."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from lightning_meddpo.eval import benchmark

GRID = {"sft": "configs/demo/sft.yaml", "dpo": "configs/demo/dpo.yaml"}


def grid_args(out_dir: Path) -> list[str]:
    return [
        f"--out_dir={out_dir}",
        f"--formulations={json.dumps(GRID)}",
        "--baseline=sft",
        "--start_from=sft",
        "--start_from_args=[--model.init_args.lr=1.0e-4]",
        '--trainer={"max_epochs": 1, "log_every_n_steps": 1}',
        '--demo_sizes={"n_train": 24, "n_val": 8, "n_test": 8}',
        "--eval.args=[--data.init_args.generation.max_new_tokens=4]",
    ]


@pytest.fixture(scope="session")
def finished_benchmark(tmp_path_factory) -> Path:
    """A finished small benchmark. It lives at a fixed path under the session's base temp directory,
    so a second request (test_notebook.py imports this fixture) is a rerun that skips every run."""
    out_dir = tmp_path_factory.getbasetemp() / "benchmark"
    benchmark.main(grid_args(out_dir))
    return out_dir


def test_benchmark_grid(finished_benchmark):
    out = finished_benchmark
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["formulation"] for r in rows] == ["sft", "dpo"]
    for column in ("closed_accuracy", "closed_accuracy_strict", "open_recall", "open_exact_match", "open_f1",
                   "val_reward_accuracy", "delta_closed_accuracy", "delta_val_reward_accuracy"):
        assert column in rows[0], sorted(rows[0])
    sft, dpo = rows
    assert float(sft["delta_open_recall"]) == 0.0
    assert math.isclose(float(dpo["delta_val_reward_accuracy"]),
                        float(dpo["val_reward_accuracy"]) - float(sft["val_reward_accuracy"]), abs_tol=1e-5)
    for r in rows:
        assert 0.0 <= float(r["val_reward_accuracy"]) <= 1.0 and 0.0 <= float(r["closed_accuracy"]) <= 1.0
        assert int(r["steps"]) == 3  # 24 pairs, batch 8, 1 epoch
        assert 1 <= int(r["checkpoint_step"]) <= 3
    md = (out / "summary.md").read_text()
    assert "| **sft** |" in md and "| dpo |" in md and "closed_accuracy" in md
    for png in ("metrics.png", "curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    questions = (out / "data").glob("*/vqa_test.jsonl")
    (question_file,) = list(questions)  # SFT and DPO share one data directory: identical data
    n_questions = len(question_file.read_text().splitlines())
    for name in GRID:
        result = json.loads((out / name / "result.json").read_text())
        assert Path(result["checkpoint"]).parent == out / name / "fit" / "checkpoints"
        assert "--seed_everything=0" in result["commands"]["fit"] and "--trainer.max_epochs=1" in result["commands"]["fit"]
        predictions = (out / name / "test" / "predictions.jsonl").read_text().splitlines()
        assert len(predictions) == n_questions
    # DPO started from SFT's final weights (the paper's protocol: one starting model for every method)
    sft_result = json.loads((out / "sft" / "result.json").read_text())
    dpo_result = json.loads((out / "dpo" / "result.json").read_text())
    dpo_fit = dpo_result["commands"]["fit"]
    assert f"--model.init_args.init_from={out / 'sft' / 'fit' / 'checkpoints' / 'last.ckpt'}" in dpo_fit
    assert dpo_fit[-1] == "--model.init_args.lr=1.0e-4" and "--model.init_args.lr=1.0e-4" not in sft_result["commands"]["fit"]
    assert dpo_result["commands"]["start_from"] == sft_result["finished_at"]
    assert not any(a.startswith("--model.init_args.init_from") for a in sft_result["commands"]["fit"])


def test_rerun_skips_finished_runs(finished_benchmark, capsys):
    out = finished_benchmark
    stamps = {p: p.stat().st_mtime_ns for name in GRID for p in [out / name / "result.json", *(out / name / "fit").rglob("*")]}
    results = benchmark.main(grid_args(out))
    assert [r["name"] for r in results] == ["sft", "dpo"]
    assert capsys.readouterr().out.count("finished earlier: skipped") == 2
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing refitted or retested
    # A changed budget is not the finished run: it would be redone.
    args = benchmark.build_parser().parse_args([*grid_args(out), '--trainer={"max_epochs": 2}'])
    runner = benchmark.Runner(args)
    config = runner.resolve(GRID["sft"])
    commands = {"fit": runner.fit_command("sft", config), "test": runner.test_command("sft", config, None)}
    assert runner.finished("sft", commands) is None
    # A refitted start run redoes the runs that started from it.
    runner = benchmark.Runner(benchmark.build_parser().parse_args(grid_args(out)))
    commands = runner.commands("dpo", runner.resolve(GRID["dpo"]))
    assert runner.finished("dpo", commands) is not None
    assert runner.finished("dpo", {**commands, "start_from": "2000-01-01T00:00:00Z"}) is None
    assert runner.finished("dpo", {**commands, "test_checkpoint": "last"}) is None  # another checkpoint tested
    with pytest.raises(SystemExit, match="start_from 'sft' has no finished run"):
        benchmark.main([*grid_args(out.parent / "empty-benchmark"), "--only=[dpo]"])


def test_demo_grid_config_and_missing_configs(tmp_path):
    args = benchmark.build_parser().parse_args(["--config", "configs/benchmark/demo.yaml"])
    assert list(args.formulations) == ["sft", "dpo", "dpo_nll", "ipo", "simpo", "orpo", "copo", "mdpo", "mmedpo",
                                       "targeted"]
    assert args.baseline == "sft" and args.eval.config == "configs/eval/demo_vqa.yaml" and args.start_from == "sft"
    block = benchmark.data_block(Path("configs/demo/dpo.yaml"))  # follows `data: base_data.yaml`
    assert block["class_path"].endswith("PreferenceDataModule")
    options = benchmark.demo_options(block, {"n_train": 24}, seed=3)
    assert options["n_train"] == 24 and options["seed"] == 3
    with pytest.raises(SystemExit, match="fit configs not found.*nope.yaml"):
        benchmark.main([f"--out_dir={tmp_path}", '--formulations={"x": "configs/demo/nope.yaml"}'])
