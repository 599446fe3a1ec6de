"""`python -m lightning_meddpo benchmark --config configs/benchmark/demo.yaml`: a grid of formulations,
trained and evaluated under identical conditions, over several seeds, compared in one table.

For each formulation (its fit configs: a formulation config, e.g. configs/formulations/dpo.yaml, then the grid's `backbone`,
e.g. configs/backbones/demo.yaml, then any overlays it lists) and each seed in `seeds` the runner
1. fits it as a subprocess (`python -m lightning_meddpo fit --config FORMULATION --config BACKBONE ...`) with the overrides every
   run shares: the seed (`seed_everything` and the data's shuffle/corruption seed), the trainer budget
   (`trainer:`), the data options (`data:`) and, for configs that build the synthetic demo data, the demo
   sizes (`demo_sizes:`), then `fit_args` and the formulation's own `formulation_args` (its data, or its
   hyper-parameters at the grid's scale).
   Demo data is generated under `<out_dir>/data/` with `data_seed` (the same data for every training
   seed), one directory per distinct set of demo options;
2. tests the run's checkpoint (`eval.checkpoint`) on each evaluation set: `evals:` names several
   (name -> {config, test_file, image_root, args}: the paper's VQA-RAD, SLAKE, PathVQA, MIMIC-CXR, ...),
   or `eval.config` / `eval.test_file` one (default: the demo data's vqa_test.jsonl);
3. reads the metrics back from TensorBoard and writes `<out_dir>/<name>/seed_<s>/result.json` LAST: it
   marks the run finished. A rerun skips runs whose result.json records the same commands; a run with a
   changed command, or without result.json, is redone from scratch.

With `start_from: sft`, that formulation runs first (per seed, with `start_run_args`) and every other run
of the seed starts from its final weights (`model.init_args.init_from`, so the reference model is that
SFT model too), with `start_from_args` added: the paper's protocol, where every preference formulation starts
from one instruction-tuned model. A refit of the start run redoes the runs that started from it.

Then commands/report.py compares them: per metric the mean over seeds and questions with a 95% bootstrap
interval, each formulation's paired difference to the baseline with its interval, the error analysis
(eval/errors.py) and an image-blind row, in `summary.csv`, `summary.md` and `metrics.png`, `errors.png`,
`curves.png`. Layout: <out_dir>/<name>/seed_<s>/{fit,test[_<eval>]}/...
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser

from lightning_meddpo.checkpoints import write_text_atomic
from lightning_meddpo.commands.report import (
    RESULT_NAME,
    SINGLE_EVAL,
    eval_dir_name,
    load_results,
    plot_curves,
    plot_errors,
    plot_metrics,
    summarize,
    training_curves,
    write_summary,
)

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_EVAL_CONFIG = "configs/eval/demo_vqa.yaml"
DEMO_SIZE_KEYS = ("n_train", "n_val", "n_test")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m lightning_meddpo benchmark",
                       description="Fit and test a grid of formulations over several seeds under identical conditions "
                                   "and compare them in one table (e.g. --config configs/benchmark/demo.yaml).")
    p.add_argument("--config", action=ActionConfigFile, help="benchmark YAML (see configs/benchmark/demo.yaml)")
    p.add_argument("--backbone", type=str | None, default=None,
                   help="the backbone config every formulation is stacked on (configs/backbones/*.yaml)")
    p.add_argument("--formulations", type=dict[str, str | list[str]], required=True,
                   help="name -> its formulation config, or [formulation, overlays...] (the backbone goes between them; "
                        "paths relative to the current directory, else to the repository)")
    p.add_argument("--baseline", type=str | None, default="sft", help="formulation the differences are taken to")
    p.add_argument("--start_from", type=str | None, default=None,
                   help="formulation whose final checkpoint every other run of a seed starts from (it runs first)")
    p.add_argument("--start_run_args", type=list[str], default=[], help="extra fit arguments for the start_from run")
    p.add_argument("--start_from_args", type=list[str], default=[],
                   help="extra fit arguments for the runs that start from start_from (e.g. a smaller lr)")
    p.add_argument("--out_dir", type=str, default="runs/benchmark")
    p.add_argument("--seed", type=int, default=0, help="the seed, when `seeds` is not given")
    p.add_argument("--seeds", type=list[int] | None, default=None, help="one run per formulation and seed")
    p.add_argument("--data_seed", type=int | None, default=None, help="demo data seed (default: the first seed)")
    p.add_argument("--trainer", type=dict[str, Any], default={}, help="trainer overrides for every fit (the budget)")
    p.add_argument("--data", type=dict[str, Any], default={}, help="data.init_args overrides for every fit")
    p.add_argument("--demo_sizes", type=dict[str, int] | None, default=None,
                   help="n_train/n_val/n_test for configs that generate the demo data")
    p.add_argument("--fit_args", type=list[str], default=[], help="extra CLI arguments for every fit")
    p.add_argument("--formulation_args", type=dict[str, list[str]], default={},
                   help="name -> extra fit arguments for that formulation only, after fit_args: its own data (the "
                        "targeted pairs, MMedPO's weighted pairs) or its hyper-parameters at this grid's scale")
    p.add_argument("--eval.config", type=str, default=DEFAULT_EVAL_CONFIG, help="evaluation DataModule config")
    p.add_argument("--eval.test_file", type=str | None, default=None,
                   help="held-out question file (default: <out_dir>/data/<base>/vqa_test.jsonl)")
    p.add_argument("--eval.checkpoint", type=Literal["best", "last"], default="best", help="best (falls back to last) or last")
    p.add_argument("--eval.args", type=list[str], default=[], help="extra CLI arguments for every test")
    p.add_argument("--evals", type=dict[str, dict[str, Any]] | None, default=None,
                   help="several evaluation sets: name -> {config, test_file, image_root (optional), args (optional)}")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--only", type=list[str] | None, default=None, help="run only these formulations")
    p.add_argument("--force", type=bool, default=False, help="refit finished runs too")
    p.add_argument("--plots", type=bool, default=True)
    p.add_argument("--python", type=str, default=sys.executable)
    p.add_argument("--launcher", type=Literal["local", "slurm"], default="local",
                   help="local: every run here, one after another; slurm: one Slurm job per run through submitit "
                        "(pip install -e '.[cluster]'), see commands/slurm.py")
    p.add_argument("--slurm", type=dict[str, Any], default={},
                   help="Slurm resources: partition, nodes, gpus_per_node, time_min, account, cpus_per_task, mem_gb, "
                        "sbatch (other #SBATCH options: name -> value), setup (shell lines), eval (the finishing "
                        "job's own: gpus_per_node, time_min, ...)")
    return p


def seeds_of(args) -> list[int]:
    return list(args.seeds) if args.seeds else [args.seed]


# ---------------------------------------------------------------- reading fit configs
def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def data_block(config_paths: list[Path]) -> dict[str, Any]:
    """The `data:` section of stacked fit configs, later files over earlier ones key by key (as jsonargparse
    merges them), following a nested file reference (`data: base_data.yaml`)."""
    merged: dict[str, Any] = {}
    for path in config_paths:
        data = _load_yaml(path).get("data") or {}
        if isinstance(data, str):
            data = _load_yaml(path.parent / data)
        if isinstance(data, dict):
            merged = _merged(merged, data)
    return merged


def config_args(configs: list[Path]) -> list[str]:
    return [arg for config in configs for arg in ("--config", str(config))]


def _fmt_arg(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list, bool)) or value is None else str(value)


def demo_options(block: dict[str, Any], sizes: dict[str, int] | None, seed: int) -> dict[str, Any] | None:
    """The demo-data options this run will use (its config's, with the benchmark's sizes and seed), or None."""
    demo = (block.get("init_args") or {}).get("demo")
    if not demo:
        return None
    options = dict(demo) if isinstance(demo, dict) else {}
    options.update(sizes or {})
    options["seed"] = seed
    return options


def data_dir_for(out_dir: Path, options: dict[str, Any]) -> Path:
    """One directory per distinct set of demo options: identical options share files."""
    extra = {k: v for k, v in sorted(options.items()) if k not in (*DEMO_SIZE_KEYS, "seed")}
    tag = "base" if not extra else "_".join(f"{k}{v}" for k, v in extra.items())
    key = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:8]
    return out_dir / "data" / f"{tag}-{key}"


# ---------------------------------------------------------------- one run
class Runner:
    """Fits and tests one (formulation, seed) at a time; a run's directory is <out_dir>/<name>/seed_<s>."""

    def __init__(self, args):
        self.args = args
        self.out_dir = Path(args.out_dir)
        data_seed = args.data_seed if args.data_seed is not None else seeds_of(args)[0]
        self.base_options = {**(args.demo_sizes or {}), "seed": data_seed}

    def run_dir(self, name: str, seed: int) -> Path:
        return self.out_dir / name / f"seed_{seed}"

    def resolve(self, path: str) -> Path:
        """An absolute path: relative to the current directory, else to the repository (its configs/)."""
        p = Path(path)
        if p.is_absolute():
            return p
        if not p.exists() and (REPO_ROOT / p).exists():
            return REPO_ROOT / p
        return p.absolute()

    def prepare_data(self, options: dict[str, Any]) -> Path:
        from lightning_meddpo.registry import data_maker

        directory = data_dir_for(self.out_dir, options)
        data_maker("demo")([directory / "train.json"], **options)  # the demo's whole dataset, in that folder
        return directory

    def evaluations(self) -> dict[str, dict[str, Any]]:
        """name -> {config, test_file, args}: the `evals` given, or the one `eval.*` describes."""
        a = self.args
        if a.evals:
            out = {}
            for name, spec in a.evals.items():
                if not spec.get("test_file") or not spec.get("config"):
                    raise SystemExit(f"evals.{name}: needs config and test_file")
                args = [f"--data.init_args.image_root={spec['image_root']}"] if spec.get("image_root") else []
                out[name] = {"config": spec["config"], "test_file": self.resolve(spec["test_file"]),
                             "args": args + list(spec.get("args") or [])}
            return out
        test_file = self.resolve(a.eval.test_file) if a.eval.test_file else self.prepare_data(dict(self.base_options)) / "vqa_test.jsonl"
        return {SINGLE_EVAL: {"config": a.eval.config, "test_file": test_file, "args": []}}

    def configs(self, name: str) -> list[Path]:
        """The fit configs of a formulation in stacking order: its formulation config, the grid's backbone, its overlays."""
        own = self.args.formulations[name]
        own = [own] if isinstance(own, str) else list(own)
        paths = own[:1] + ([self.args.backbone] if self.args.backbone else []) + own[1:]
        return [self.resolve(p) for p in paths]

    def fit_command(self, name: str, configs: list[Path], seed: int) -> list[str]:
        a = self.args
        run_dir = self.run_dir(name, seed)
        cmd = ["fit", *config_args(configs), f"--seed_everything={seed}"]
        cmd += [f"--trainer.{k}={_fmt_arg(v)}" for k, v in a.trainer.items()]
        cmd += [f"--trainer.logger.init_args.save_dir={run_dir.parent}", f"--trainer.logger.init_args.name={run_dir.name}",
                "--trainer.logger.init_args.version=fit", f"--trainer.default_root_dir={run_dir}",
                "--trainer.enable_progress_bar=false"]
        options = demo_options(data_block(configs), a.demo_sizes, self.base_options["seed"])
        if options is not None:
            directory = self.prepare_data(options)
            cmd += [f"--data.init_args.{split}_file={directory / f'{split}.json'}" for split in ("train", "val", "test")]
            cmd += ["--data.init_args.demo=false"]
        cmd += [f"--data.init_args.{k}={_fmt_arg(v)}" for k, v in a.data.items()]
        cmd += ["--data.init_args.seed=" + str(seed)]
        if a.start_from and name == a.start_from:
            cmd += list(a.start_run_args)
        elif a.start_from:
            cmd += [f"--model.init_args.init_from={self.start_checkpoint(seed)}", *a.start_from_args]
        return cmd + list(a.fit_args) + list(a.formulation_args.get(name, []))

    def start_checkpoint(self, seed: int) -> Path:
        return self.run_dir(self.args.start_from, seed) / "fit" / "checkpoints" / "last.ckpt"

    def test_commands(self, name: str, configs: list[Path], seed: int, checkpoint: Path | None) -> dict[str, list[str]]:
        a = self.args
        run_dir = self.run_dir(name, seed)
        out = {}
        for eval_name, spec in self.evaluations().items():
            version = eval_dir_name(eval_name)
            cmd = ["test", *config_args(configs), "--data", str(self.resolve(spec["config"])),
                   f"--data.init_args.test_file={spec['test_file']}", "--data.init_args.demo=false",
                   f"--seed_everything={seed}",
                   f"--trainer.logger.init_args.save_dir={run_dir.parent}", f"--trainer.logger.init_args.name={run_dir.name}",
                   f"--trainer.logger.init_args.version={version}", f"--trainer.default_root_dir={run_dir}",
                   "--trainer.enable_progress_bar=false", *spec["args"]]
            if checkpoint is not None:
                cmd.append(f"--ckpt_path={checkpoint}")
            out[eval_name] = cmd + list(a.eval.args)
        return out

    def commands(self, name: str, configs: list[Path], seed: int) -> dict[str, Any]:
        """What a finished run is compared against on a rerun (the test's checkpoint is only known later)."""
        commands: dict[str, Any] = {"fit": self.fit_command(name, configs, seed),
                                    "test": self.test_commands(name, configs, seed, None),
                                    "test_checkpoint": self.args.eval.checkpoint}
        start = self.args.start_from
        if start and name != start:  # the start run's own finish: refitting it redoes this run
            result = self.run_dir(start, seed) / RESULT_NAME
            commands["start_from"] = json.loads(result.read_text(encoding="utf-8"))["finished_at"]
        return commands

    def checkpoint(self, name: str, seed: int) -> Path:
        ckpt_dir = self.run_dir(name, seed) / "fit" / "checkpoints"
        best = sorted(ckpt_dir.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime)
        last = sorted(ckpt_dir.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
        if self.args.eval.checkpoint == "best" and best:
            return best[-1]
        if last:
            return last[-1]
        if best:
            return best[-1]
        raise FileNotFoundError(f"{name} (seed {seed}): no checkpoint in {ckpt_dir}; the fit config must save one")

    def call(self, cmd: list[str], log_file: Path, launch: list[str] = ()) -> tuple[float, float]:
        """Run `python -m lightning_meddpo CMD` (after `launch`: srun in a Slurm job); (wall seconds, CPU seconds of
        the subprocess)."""
        start, cpu_start = time.perf_counter(), _children_cpu()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("w", encoding="utf-8") as f:
            f.write(" ".join([*launch, self.args.python, "-m", "lightning_meddpo", *cmd]) + "\n\n")
            f.flush()
            proc = subprocess.run([*launch, self.args.python, "-m", "lightning_meddpo", *cmd], stdout=f,
                                  stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
        if proc.returncode != 0:
            tail = log_file.read_text(encoding="utf-8", errors="replace")[-4000:]
            raise RuntimeError(f"`{cmd[0]}` failed ({proc.returncode}); full log: {log_file}\n{tail}")
        return time.perf_counter() - start, _children_cpu() - cpu_start

    def finished(self, name: str, seed: int, commands: dict[str, Any]) -> dict[str, Any] | None:
        path = self.run_dir(name, seed) / RESULT_NAME
        if self.args.force or not path.is_file():
            return None
        result = json.loads(path.read_text(encoding="utf-8"))
        if result.get("commands") != commands:
            print(f"[{name} seed {seed}] settings changed since the finished run: redoing it")
            return None
        return result

    def run(self, name: str, seed: int) -> dict[str, Any]:
        configs = self.configs(name)
        commands = self.commands(name, configs, seed)
        done = self.finished(name, seed, commands)
        run_dir = self.run_dir(name, seed)
        if done is not None:
            print(f"[{name} seed {seed}] finished earlier: skipped ({run_dir / RESULT_NAME})")
            return done
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an unfinished or outdated run: start clean
        print(f"[{name} seed {seed}] fit {' + '.join(str(c) for c in configs)}", flush=True)
        fit_seconds, fit_cpu = self.call(commands["fit"], run_dir / "fit.log")
        return self.finish(name, seed, configs, commands, fit_seconds, fit_cpu)

    def finish(self, name: str, seed: int, configs: list[Path], commands: dict[str, Any], fit_seconds: float | None,
               fit_cpu: float | None) -> dict[str, Any]:
        """Test the fitted run's checkpoint on every evaluation and write its result.json (last: it marks the run
        finished). The second half of `run`, and the whole of a Slurm run's finishing job."""
        run_dir = self.run_dir(name, seed)
        checkpoint = self.checkpoint(name, seed)
        print(f"[{name} seed {seed}] test {checkpoint.name}", flush=True)
        test_seconds = test_cpu = 0.0
        for eval_name, cmd in self.test_commands(name, configs, seed, checkpoint).items():
            seconds, cpu = self.call(cmd, run_dir / f"{eval_dir_name(eval_name)}.log")
            test_seconds, test_cpu = test_seconds + seconds, test_cpu + cpu
        evaluations = self.evaluations()
        result = {
            "name": name, "seed": seed, "configs": [str(c) for c in configs], "commands": commands, "checkpoint": str(checkpoint),
            "fit_seconds": fit_seconds, "test_seconds": test_seconds, "fit_cpu_seconds": fit_cpu, "test_cpu_seconds": test_cpu,
            "test_files": {e: str(spec["test_file"]) for e, spec in evaluations.items()},
            **collect_metrics(run_dir, list(evaluations)), "checkpoint_step": checkpoint_step(checkpoint),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_text_atomic(run_dir / RESULT_NAME, json.dumps(result, indent=1) + "\n", "the run's result")  # marks it finished
        print(f"[{name} seed {seed}] done in {(fit_seconds or 0) + test_seconds:.0f} s: "
              + ", ".join(f"{k}={v:.3f}" for k, v in result["metrics"].items()), flush=True)
        return result


def checkpoint_step(path: Path) -> int | None:
    """The global step stored in a Lightning checkpoint (memory-mapped: no weights are read)."""
    import torch

    try:
        return int(torch.load(path, map_location="cpu", mmap=True, weights_only=True)["global_step"])
    except Exception as e:  # noqa: BLE001 - the step is informative only
        log.warning("%s: cannot read global_step (%s)", path, e)
        return None


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _last(series: list[tuple[int, float]] | None) -> float:
    return float(series[-1][1]) if series else math.nan


def collect_metrics(run_dir: Path, evaluations: list[str]) -> dict[str, Any]:
    """test/* of each evaluation (prefixed `<eval>/` when there are several), the final val/* and the step
    count of the fit (TensorBoard event files)."""
    from lightning_meddpo.eval.tensorboard import read_scalars

    fit = read_scalars(run_dir / "fit")
    metrics = {}
    for eval_name in evaluations:
        version = eval_dir_name(eval_name)
        prefix = "" if eval_name == SINGLE_EVAL else f"{eval_name}/"
        test = read_scalars(run_dir / version)
        metrics.update({prefix + tag.removeprefix("test/"): _last(series) for tag, series in test.items()
                        if tag.startswith("test/")})
    metrics["val_reward_accuracy"] = _last(fit.get("val/rewards/accuracies"))
    metrics["val_reward_margin"] = _last(fit.get("val/rewards/margins"))
    metrics["val_loss"] = _last(fit.get("val/loss"))
    # Lightning logs val/* and `epoch` at the last step: the number of optimizer steps trained.
    steps = max((step for series in fit.values() for step, _ in series), default=-1) + 1
    return {"metrics": {k: v for k, v in metrics.items() if not math.isnan(v)}, "steps": steps}


def run(args) -> list[dict[str, Any]]:
    """Fit and test every formulation x seed not finished yet, then write the comparison (args: build_parser's)."""
    names = list(args.formulations)
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            raise SystemExit(f"--only names {unknown} that are not in formulations {names}")
        names = [n for n in names if n in args.only]
    runner = Runner(args)
    unknown = sorted(set(args.formulation_args) - set(args.formulations))
    if unknown:
        raise SystemExit(f"formulation_args names {unknown} that are not in formulations {list(args.formulations)}")
    missing = {n: [str(c) for c in runner.configs(n) if not c.is_file()] for n in names}
    missing = {n: paths for n, paths in missing.items() if paths}
    if missing:
        raise SystemExit(f"fit configs not found: {missing} (paths are relative to the current directory)")
    seeds = seeds_of(args)
    if args.start_from:
        if args.start_from not in args.formulations:
            raise SystemExit(f"start_from {args.start_from!r} is not in formulations {list(args.formulations)}")
        if args.start_from in names:
            names = [args.start_from] + [n for n in names if n != args.start_from]  # it runs first
        elif not all((runner.run_dir(args.start_from, s) / RESULT_NAME).is_file() for s in seeds):
            raise SystemExit(f"start_from {args.start_from!r} has no finished run in {runner.out_dir} for every seed: "
                             "include it in --only")
    runner.out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(runner.out_dir / "formulations.json", json.dumps(names) + "\n", "the benchmark's formulations")
    if args.launcher == "slurm":
        from lightning_meddpo.commands.slurm import run_on_slurm

        return run_on_slurm(runner, names, seeds)
    start = time.perf_counter()
    results = [runner.run(name, seed) for seed in seeds for name in names]
    baseline = args.baseline if args.baseline in names else None
    paths = write_summary(runner.out_dir, baseline, bootstrap=args.bootstrap)
    cpu = sum(r.get("fit_cpu_seconds", 0) + r.get("test_cpu_seconds", 0) for r in results)
    print(f"benchmark: {len(results)} runs ({len(names)} formulations x {len(seeds)} seeds) in "
          f"{time.perf_counter() - start:.0f} s (this invocation); fits and tests took {cpu:.0f} CPU seconds in all; "
          f"{paths['md']}")
    print(paths["md"].read_text(encoding="utf-8"))
    if args.plots:
        write_plots(runner.out_dir, baseline, args.bootstrap)
    return results


def write_plots(out_dir: Path, baseline: str | None, bootstrap: int = 1000) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("matplotlib is not installed: no plots written (pip install matplotlib, or --plots false)")
        return
    summary = summarize(load_results(out_dir), out_dir, baseline, bootstrap=bootstrap)
    plot_metrics(summary, out_dir / "metrics.png")
    plot_errors(summary, out_dir / "errors.png")
    plot_curves(training_curves(out_dir), out_dir / "curves.png")
    print(f"plots: {out_dir / 'metrics.png'}, {out_dir / 'errors.png'}, {out_dir / 'curves.png'}")
