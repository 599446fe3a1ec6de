"""The shipped configs: every method config stacked on the demo backbone fits a few steps through the CLI;
stacked on the LLaVA-Med and HuatuoGPT-Vision backbones it parses (`--print_config`, which does not
instantiate the model) with the paper's settings.

Speed: importing lightning's CLI costs ~10 s of CPU per process, so the demo fits run as two CLI
subprocesses (each calls `lightning_meddpo.cli.main` once per config, exactly as
`python -m lightning_meddpo fit --config ...` does, and records the outcome per config) plus one
subprocess for all the `--print_config` runs, all started together and read by parametrized tests.
One config is also run through `python -m lightning_meddpo` itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_meddpo.commands.benchmark import config_args, data_block

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SMALL_DEMO = {"n_train": 16, "n_val": 8, "n_test": 8}
FIT_ARGS = [
    "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
    "--trainer.logger=false",
]


METHODS = sorted((CONFIGS / "formulations").glob("*.yaml"))
OVERLAYS = {"targeted": [CONFIGS / "data" / "demo_targeted.yaml"]}  # the demo's targeted mix has its own data


def stack(backbone: str, method: Path) -> list[Path]:
    """The configs of one run, in order: method, backbone, and on the demo the method's data overlay."""
    return [method, CONFIGS / "backbones" / f"{backbone}.yaml", *(OVERLAYS.get(method.stem, []) if backbone == "demo" else [])]


PAPER = [(backbone, method) for backbone in ("llava_med", "huatuo") for method in METHODS]
FORMULATIONS = {"sft", "dpo", "ipo", "cdpo", "dpo_nll", "hinge", "robust", "simpo", "orpo", "cpo",
                "copo", "mdpo", "mmedpo", "targeted", "kto"}

DRIVER = r"""
import contextlib, io, json, sys, traceback
from lightning_meddpo.cli import main
jobs, out = json.loads(sys.argv[1]), sys.argv[2]
results = {}
for name, args in jobs:
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            main(args)
        results[name] = {"ok": True}
    except SystemExit as e:  # --print_config exits after printing
        results[name] = {"ok": e.code in (0, None), "stdout": stdout.getvalue(), "error": f"exit {e.code}"}
    except Exception:
        results[name] = {"ok": False, "error": traceback.format_exc()[-3000:]}
json.dump(results, open(out, "w"))
"""


def demo_options(method: Path) -> dict:
    """The run's own demo-data options (e.g. the targeted overlay's image_pair_fraction), sizes made small."""
    options = data_block(stack("demo", method))["init_args"].get("demo", {})
    return {**(options if isinstance(options, dict) else {}), **SMALL_DEMO}


def fit_args(method: Path, data_root: Path, run_root: Path) -> list[str]:
    options = demo_options(method)
    data_dir = data_root / f"frac{options.get('image_pair_fraction', 0.0)}"
    return [
        "fit", *config_args(stack("demo", method)), *FIT_ARGS,
        f"--trainer.default_root_dir={run_root / method.stem}",
        f"--data.init_args.train_file={data_dir / 'train.json'}",
        f"--data.init_args.val_file={data_dir / 'val.json'}",
        f"--data.init_args.test_file={data_dir / 'test.json'}",
        f"--data.init_args.demo={json.dumps(options)}",
    ]


def paper_grid_commands(out_dir: Path) -> dict[str, list[str]]:
    """Every fit command of the paper's benchmark grids (configs/benchmark/{llava_med,huatuo}.yaml) and the
    test commands of one formulation on each of their evaluation sets, as the benchmark runner builds them."""
    from lightning_meddpo.commands import benchmark

    out = {}
    for grid in ("llava_med", "huatuo"):
        args = benchmark.build_parser().parse_args(["--config", str(CONFIGS / "benchmark" / f"{grid}.yaml"),
                                                    f"--out_dir={out_dir / grid}"])
        runner = benchmark.Runner(args)
        for name in args.formulations:
            out[f"grid:{grid}/{name}"] = runner.fit_command(name, runner.configs(name), args.seeds[0])
        tests = runner.test_commands("dpo", runner.configs("dpo"), args.seeds[0], None)
        out.update({f"grid:{grid}/test/{evaluation}": cmd for evaluation, cmd in tests.items()})
    return out


def environment() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every CLI run at once (two fit workers, one print_config worker); wait; results by name."""
    from lightning_meddpo.demo.synthetic import ensure_demo_dataset
    from lightning_meddpo.demo.tiny import resolve_tiny

    root = tmp_path_factory.mktemp("configs")
    resolve_tiny("tiny://llama")  # build the tiny backbone once, before processes race for it
    for method in METHODS:  # likewise the demo data (the DataModule's seed is 0)
        options = demo_options(method)
        ensure_demo_dataset(root / "data" / f"frac{options.get('image_pair_fraction', 0.0)}", seed=0, **options)
    fits = [(m.stem, fit_args(m, root / "data", root / "runs")) for m in METHODS]
    prints = [(f"{b}/{m.stem}", ["fit", *config_args(stack(b, m)), "--print_config"]) for b, m in PAPER]
    prints += [(name, [*cmd, "--print_config"]) for name, cmd in paper_grid_commands(root / "grid").items()]
    workers = {"fit0": fits[0::2], "fit1": fits[1::2], "print": prints}
    procs = {}
    for name, jobs in workers.items():
        out = root / f"{name}.json"
        procs[name] = (subprocess.Popen(
            [sys.executable, "-c", DRIVER, json.dumps(jobs), str(out)], cwd=root, env=environment(),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ), out)
    results = {}
    for name, (proc, out) in procs.items():
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0 and out.exists(), f"{name} worker failed:\n{log[-3000:]}"
        results.update(json.loads(out.read_text()))
    return {"results": results, "root": root}


def test_every_formulation_has_a_method_config_and_every_backbone_one_config():
    assert {p.stem for p in METHODS} == FORMULATIONS
    assert {p.stem for p in (CONFIGS / "backbones").glob("*.yaml")} == {"demo", "llava_med", "huatuo"}


@pytest.mark.parametrize("method", METHODS, ids=[m.stem for m in METHODS])
def test_method_fits_on_the_demo_backbone(runs, method):
    result = runs["results"][method.stem]
    assert result["ok"], result.get("error")
    ckpts = {p.name for p in (runs["root"] / "runs" / method.stem / "checkpoints").glob("*.ckpt")}
    assert "last.ckpt" in ckpts
    # a best-* checkpoint exists only if the monitored key val/rewards/accuracies was logged
    assert any(name.startswith("best-") for name in ckpts), ckpts


def test_demo_config_through_python_dash_m_logs_every_term(runs, tmp_path):
    """mDPO through the real entry point, with its TensorBoard logger: every term and the
    image-conditioning rewards are logged for train and val (read back from the event files)."""
    from lightning_meddpo.eval.tensorboard import read_scalars

    args = [a for a in fit_args(CONFIGS / "formulations" / "mdpo.yaml", runs["root"] / "data", tmp_path)
            if a != "--trainer.logger=false"]
    args += [f"--trainer.logger.init_args.save_dir={tmp_path / 'tb'}", "--trainer.log_every_n_steps=1"]
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_meddpo", *args],
        cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (version,) = (tmp_path / "tb").rglob("version_*")
    assert version.parent.relative_to(tmp_path / "tb") == Path("demo/mdpo")  # runs/<backbone>/<method>
    assert (version / "checkpoints" / "last.ckpt").exists()
    tags = set(read_scalars(version))
    for stage in ("train", "val"):
        suffix = "_epoch" if stage == "train" else ""
        for key in ("loss", "loss/dpo", "loss/copo", "loss/anchor", "rewards/accuracies", "rewards/margins",
                    "rewards_img/chosen_m", "rewards_img/chosen_mprime", "rewards_img/margins",
                    "rewards_img/accuracies"):
            assert f"{stage}/{key}{suffix}" in tags, (stage, key, sorted(tags))
    assert "train/loss/copo_step" in tags


@pytest.mark.parametrize(("backbone", "method"), PAPER, ids=[f"{b}-{m.stem}" for b, m in PAPER])
def test_paper_config_parses_with_the_papers_settings(runs, backbone, method):
    result = runs["results"][f"{backbone}/{method.stem}"]
    assert result["ok"], result.get("error")
    cfg = yaml.safe_load(result["stdout"])
    trainer, data, model = cfg["trainer"], cfg["data"]["init_args"], cfg["model"]["init_args"]
    assert trainer["max_epochs"] == 3 and trainer["precision"] == "bf16-mixed"
    assert data["batch_size"] * trainer["accumulate_grad_batches"] * trainer["devices"] * trainer["num_nodes"] == 16
    assert model["lr"] == 1e-7 and model["warmup_ratio"] == 0.03
    expected = {"llava_med": (2048, "v1", "llava-med"), "huatuo": (1024, "qwen_2", "huatuo")}[backbone]
    assert data["max_length"] == expected[0] and model["chat_template"] == expected[1]
    assert model["backbone"].startswith("/path/to/") and expected[2] in model["backbone"]
    if "beta" in model and method.stem != "orpo":
        assert model["beta"] == 0.1
    if method.stem in ("sft", "simpo", "orpo", "cpo"):  # the family's own default, not the base module's
        assert model["reference"] == "none"
    if method.stem == "dpo_nll":
        assert model["nll_weight"] == 1.0
    monitors = [c["init_args"]["monitor"] for c in trainer["callbacks"] if "monitor" in c.get("init_args", {})]
    assert monitors == ["val/rewards/accuracies"]


PAPER_GRID_FORMULATIONS = {"sft", "dpo", "ipo", "cdpo", "dpo_nll", "simpo", "orpo", "copo", "mdpo", "mmedpo", "targeted"}
PAPER_EVALS = {"vqa_rad", "slake", "pathvqa", "mimic_cxr", "amboss"}


@pytest.mark.parametrize("grid", ["llava_med", "huatuo"])
def test_paper_benchmark_grid_commands_parse(runs, grid):
    """The paper's grid: SFT, the nine published formulations and the targeted mix with the paper's settings,
    on the paper's five benchmarks; every fit and test command the runner would start parses."""
    results = {k.removeprefix(f"grid:{grid}/"): v for k, v in runs["results"].items() if k.startswith(f"grid:{grid}/")}
    fits = {k: v for k, v in results.items() if not k.startswith("test/")}
    tests = {k.removeprefix("test/"): v for k, v in results.items() if k.startswith("test/")}
    assert set(fits) == PAPER_GRID_FORMULATIONS and set(tests) == PAPER_EVALS
    for name, result in results.items():
        assert result["ok"], (name, result.get("error"))
    expected_template = {"llava_med": "v1", "huatuo": "qwen_2"}[grid]
    for name, result in fits.items():
        cfg = yaml.safe_load(result["stdout"])
        model, data, trainer = cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]
        assert model["lr"] == 1e-7 and trainer["max_epochs"] == 3 and model["chat_template"] == expected_template
        assert model["backbone"].startswith("/path/to/") and cfg["seed_everything"] == 42
        assert data["train_file"] == {"mmedpo": "/path/to/preference/mmedpo_train.json",
                                      "targeted": "/path/to/preference/targeted_train.json"}.get(
                                          name, "/path/to/preference/train.json")
    for evaluation, result in tests.items():
        data = yaml.safe_load(result["stdout"])["data"]["init_args"]
        assert data["test_file"].startswith("/path/to/med-vlm-dpo/data/benchmark_question_file/")
        report = evaluation in ("mimic_cxr", "amboss")
        assert data["format"] == ("report" if report else "vqa")
        assert (data["judge"] or {}).get("model") == ("gpt-4.1" if report else None)
        if grid == "huatuo":
            assert data["chat_template"] == "qwen_2"
