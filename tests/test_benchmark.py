"""The benchmark runner on a 2-formulation (SFT, DPO) x 2-seed, few-step grid: fits and tests as CLI
subprocesses, the summary (seed statistics, paired differences, error analysis) and plots, skipping of
finished runs, and the grid configs (demo, the paper's LLaVA-Med and HuatuoGPT-Vision grids)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from lightning_meddpo.commands import benchmark
from lightning_meddpo.eval.errors import ERROR_TYPES
from tests.conftest import run_program

GRID = {"sft": "configs/formulations/sft.yaml", "dpo": "configs/formulations/dpo.yaml"}


def grid_args(out_dir: Path) -> list[str]:
    return [
        f"--out_dir={out_dir}",
        "--backbone=configs/backbones/demo.yaml",
        f"--formulations={json.dumps(GRID)}",
        "--baseline=sft",
        "--seeds=[0, 1]",
        "--bootstrap=200",
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
    run_program("benchmark", grid_args(out_dir))
    return out_dir


def test_benchmark_grid(finished_benchmark):
    out = finished_benchmark
    rows = list(csv.DictReader((out / "summary.csv").open()))
    table = {(r["formulation"], r["evaluation"], r["metric"]): r for r in rows}
    assert list(dict.fromkeys(r["formulation"] for r in rows)) == ["image-blind", "sft", "dpo"]
    for metric in ("closed_accuracy", "closed_accuracy_strict", "open_recall", "open_recall_clipped", "open_f1",
                   "acc/presence", "acc/side", "acc/modality", "acc/organ", "err/correct", "err/laterality",
                   "err/missed_lesion", "err/invented_lesion", "err/wrong_modality", "err/wrong_organ", "err/visual"):
        for name in ("image-blind", "sft", "dpo"):
            assert (name, "test", metric) in table, (name, metric)
    assert ("dpo", "fit", "val_reward_accuracy") in table and ("sft", "test", "closed_accuracy_run_eval") in table
    n_questions = len(next((out / "data").glob("*/vqa_test.jsonl")).read_text().splitlines())
    for name in GRID:
        row = table[(name, "test", "closed_accuracy")]
        assert row["seeds"] == "2" and float(row["low"]) <= float(row["mean"]) <= float(row["high"])
        # the mean is the mean of the two runs' own closed accuracy (as `test` logged it)
        logged = [json.loads((out / name / f"seed_{s}" / "result.json").read_text())["metrics"]["closed_accuracy"]
                  for s in (0, 1)]
        assert math.isclose(float(row["mean"]), sum(logged) / 2, abs_tol=1e-5)
        assert math.isclose(float(row["std"]), abs(logged[0] - logged[1]) / math.sqrt(2), abs_tol=1e-5)
        shares = sum(float(table[(name, "test", f"err/{t}")]["mean"]) for t in ERROR_TYPES)
        assert math.isclose(shares, 1.0, abs_tol=1e-6)  # every question has one error type
        assert int(table[(name, "test", "err/correct")]["questions"]) == n_questions
    dpo, sft = table[("dpo", "test", "open_f1")], table[("sft", "test", "open_f1")]
    assert math.isclose(float(dpo["delta"]), float(dpo["mean"]) - float(sft["mean"]), abs_tol=1e-5)
    assert float(dpo["delta_low"]) <= float(dpo["delta"]) <= float(dpo["delta_high"])
    assert table[("sft", "test", "open_f1")]["delta"] == ""  # the baseline has no difference to itself
    md = (out / "summary.md").read_text()
    assert "| **sft** |" in md and "| dpo |" in md and "| _image-blind_ |" in md and "### Errors" in md
    assert "judged from the images' ground truth" in md and "Difference to sft" in md
    for png in ("metrics.png", "errors.png", "curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (question_file,) = list((out / "data").glob("*/vqa_test.jsonl"))  # every run shares one data directory
    for name in GRID:
        for seed in (0, 1):
            run = out / name / f"seed_{seed}"
            result = json.loads((run / "result.json").read_text())
            assert Path(result["checkpoint"]).parent == run / "fit" / "checkpoints"
            fit = result["commands"]["fit"]
            assert f"--seed_everything={seed}" in fit and f"--data.init_args.seed={seed}" in fit
            assert "--trainer.max_epochs=1" in fit and result["steps"] == 3  # 24 pairs, batch 8, 1 epoch
            assert 1 <= result["checkpoint_step"] <= 3
            assert len((run / "test" / "predictions.jsonl").read_text().splitlines()) == n_questions
    # DPO started from the same seed's SFT final weights (the paper's protocol: one starting model per seed)
    for seed in (0, 1):
        sft_result = json.loads((out / "sft" / f"seed_{seed}" / "result.json").read_text())
        dpo_fit = json.loads((out / "dpo" / f"seed_{seed}" / "result.json").read_text())["commands"]
        start = out / "sft" / f"seed_{seed}" / "fit" / "checkpoints" / "last.ckpt"
        assert f"--model.init_args.init_from={start}" in dpo_fit["fit"]
        assert dpo_fit["fit"][-1] == "--model.init_args.lr=1.0e-4" and "--model.init_args.lr=1.0e-4" not in sft_result["commands"]["fit"]
        assert dpo_fit["start_from"] == sft_result["finished_at"]
        assert not any(a.startswith("--model.init_args.init_from") for a in sft_result["commands"]["fit"])


def test_rerun_skips_finished_runs(finished_benchmark, capsys):
    out = finished_benchmark
    stamps = {p: p.stat().st_mtime_ns for name in GRID for p in [*(out / name).rglob("result.json"), *(out / name).rglob("fit/*")]}
    results = run_program("benchmark", grid_args(out))
    assert [(r["name"], r["seed"]) for r in results] == [("sft", 0), ("dpo", 0), ("sft", 1), ("dpo", 1)]
    assert capsys.readouterr().out.count("finished earlier: skipped") == 4
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing refitted or retested
    # A changed budget is not the finished run: it would be redone.
    args = benchmark.build_parser().parse_args([*grid_args(out), '--trainer={"max_epochs": 2}'])
    runner = benchmark.Runner(args)
    assert runner.finished("sft", 0, runner.commands("sft", runner.configs("sft"), 0)) is None
    # A refitted start run redoes the runs that started from it.
    runner = benchmark.Runner(benchmark.build_parser().parse_args(grid_args(out)))
    commands = runner.commands("dpo", runner.configs("dpo"), 1)
    assert runner.finished("dpo", 1, commands) is not None
    assert runner.finished("dpo", 1, {**commands, "start_from": "2000-01-01T00:00:00Z"}) is None
    assert runner.finished("dpo", 1, {**commands, "test_checkpoint": "last"}) is None  # another checkpoint tested
    with pytest.raises(SystemExit, match="start_from 'sft' has no finished run"):
        run_program("benchmark", [*grid_args(out.parent / "empty-benchmark"), "--only=[dpo]"])


def test_demo_grid_config_and_missing_configs(tmp_path):
    args = benchmark.build_parser().parse_args(["--config", "configs/benchmark/demo.yaml"])
    assert list(args.formulations) == ["sft", "dpo", "dpo_nll", "ipo", "simpo", "orpo", "copo", "mdpo", "mmedpo",
                                       "targeted"]
    assert args.baseline == "sft" and args.eval.config == "configs/eval/demo_vqa.yaml" and args.start_from == "sft"
    assert args.backbone == "configs/backbones/demo.yaml"
    targeted = benchmark.Runner(args).configs("targeted")
    assert [p.parent.name for p in targeted] == ["formulations", "backbones", "data"]
    block = benchmark.data_block(targeted)  # the data overlay merged over the backbone's data, key by key
    assert block["class_path"].endswith("PreferenceDataModule") and block["init_args"]["batch_size"] == 8
    options = benchmark.demo_options(block, {"n_train": 24}, seed=3)
    assert options["n_train"] == 24 and options["seed"] == 3 and options["image_pair_fraction"] == 0.5
    assert "image_pair_fraction" not in benchmark.demo_options(benchmark.data_block([benchmark.Runner(args).resolve(args.backbone)]), None, 0)
    with pytest.raises(SystemExit, match="fit configs not found.*nope.yaml"):
        run_program("benchmark", [f"--out_dir={tmp_path}", '--formulations={"x": "configs/formulations/nope.yaml"}'])
