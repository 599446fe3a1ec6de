"""`python -m lightning_meddpo benchmark --config configs/benchmark/demo.yaml`: a grid of formulations,
trained and evaluated under identical conditions, compared in one table.

For each formulation (an existing fit config, e.g. configs/demo/dpo.yaml) the runner
1. fits it as a subprocess (`python -m lightning_meddpo fit --config CFG ...`) with the overrides every
   run shares: the seed, the trainer budget (`trainer:`, e.g. max_epochs), the data options (`data:`)
   and, for configs that build the synthetic demo data, the demo sizes (`demo_sizes:`). Demo data is
   generated under `<out_dir>/data/`, one directory per distinct set of demo options: runs whose
   configs ask for the same demo data (most) share the same files; a config with its own construction
   (the targeted mix: image_pair_fraction 0.5) keeps it, at the same sizes and seed.
2. tests the run's checkpoint (`eval.checkpoint`: best, falling back to last) with the evaluation
   DataModule (`eval.config`, default configs/eval/demo_vqa.yaml) on ONE held-out question file for
   all runs (`eval.test_file`, default the demo data's vqa_test.jsonl), as a subprocess of `test`;
3. reads the metrics back from TensorBoard (test/* of the test, the final val/* of the fit) and writes
   `<out_dir>/<name>/result.json` LAST: it marks the run finished. A rerun skips runs whose result.json
   records the same commands; a run with a changed command, or without result.json, is redone from
   scratch (its directory is cleared first, so event files never mix).

With `start_from: sft`, that run goes first and every other run starts from its final weights
(`model.init_args.init_from`, so the reference model is that SFT model too), with `start_from_args`
added to their fits: the paper's protocol, where every preference method starts from one
instruction-tuned model. A refit of the start run
redoes the runs that started from it.

Then `summary.csv`, `summary.md` (a row per formulation, a column per metric, deltas to the baseline)
and `metrics.png`, `curves.png` (eval/report.py). Layout: <out_dir>/<name>/{fit,test}/...
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

from lightning_meddpo.eval.report import RESULT_NAME, plot_curves, plot_metrics, summary_rows, training_curves, write_summary

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_EVAL_CONFIG = "configs/eval/demo_vqa.yaml"
DEMO_SIZE_KEYS = ("n_train", "n_val", "n_test")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m lightning_meddpo benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action=ActionConfigFile, help="benchmark YAML (see configs/benchmark/demo.yaml)")
    p.add_argument("--formulations", type=dict[str, str], required=True,
                   help="name -> fit config path (relative to the current directory)")
    p.add_argument("--baseline", type=str | None, default="sft", help="formulation the deltas are taken to")
    p.add_argument("--start_from", type=str | None, default=None,
                   help="formulation whose final checkpoint every other run starts from (it runs first)")
    p.add_argument("--start_from_args", type=list[str], default=[],
                   help="extra fit arguments for the runs that start from start_from (e.g. a smaller lr)")
    p.add_argument("--out_dir", type=str, default="runs/benchmark")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trainer", type=dict[str, Any], default={}, help="trainer overrides for every fit (the budget)")
    p.add_argument("--data", type=dict[str, Any], default={}, help="data.init_args overrides for every fit")
    p.add_argument("--demo_sizes", type=dict[str, int] | None, default=None,
                   help="n_train/n_val/n_test for configs that generate the demo data")
    p.add_argument("--fit_args", type=list[str], default=[], help="extra CLI arguments for every fit")
    p.add_argument("--eval.config", type=str, default=DEFAULT_EVAL_CONFIG, help="evaluation DataModule config")
    p.add_argument("--eval.test_file", type=str | None, default=None,
                   help="held-out question file (default: <out_dir>/data/<base>/vqa_test.jsonl)")
    p.add_argument("--eval.checkpoint", type=Literal["best", "last"], default="best", help="best (falls back to last) or last")
    p.add_argument("--eval.args", type=list[str], default=[], help="extra CLI arguments for every test")
    p.add_argument("--only", type=list[str] | None, default=None, help="run only these formulations")
    p.add_argument("--force", type=bool, default=False, help="refit finished runs too")
    p.add_argument("--plots", type=bool, default=True)
    p.add_argument("--python", type=str, default=sys.executable)
    return p


# ---------------------------------------------------------------- reading fit configs
def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def data_block(config_path: Path) -> dict[str, Any]:
    """The `data:` section of a fit config, following a nested file reference (`data: base_data.yaml`)."""
    data = _load_yaml(config_path).get("data") or {}
    if isinstance(data, str):
        data = _load_yaml(config_path.parent / data)
    return data if isinstance(data, dict) else {}


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
    def __init__(self, args):
        self.args = args
        self.out_dir = Path(args.out_dir)
        self.base_options = {**(args.demo_sizes or {}), "seed": args.seed}

    def resolve(self, path: str) -> Path:
        p = Path(path)
        if p.is_absolute() or p.exists():
            return p
        if (REPO_ROOT / p).exists():
            return REPO_ROOT / p
        return p

    def prepare_data(self, options: dict[str, Any]) -> Path:
        from lightning_meddpo.data.synthetic import ensure_demo_dataset

        directory = data_dir_for(self.out_dir, options)
        ensure_demo_dataset(directory, **options)
        return directory

    def test_file(self) -> Path:
        if self.args.eval.test_file:
            return self.resolve(self.args.eval.test_file)
        return self.prepare_data(dict(self.base_options)) / "vqa_test.jsonl"

    def fit_command(self, name: str, config: Path) -> list[str]:
        a = self.args
        run_dir = self.out_dir / name
        cmd = ["fit", "--config", str(config), f"--seed_everything={a.seed}"]
        cmd += [f"--trainer.{k}={_fmt_arg(v)}" for k, v in a.trainer.items()]
        cmd += [f"--trainer.logger.init_args.save_dir={self.out_dir}", f"--trainer.logger.init_args.name={name}",
                "--trainer.logger.init_args.version=fit", f"--trainer.default_root_dir={run_dir}",
                "--trainer.enable_progress_bar=false"]
        options = demo_options(data_block(config), a.demo_sizes, a.seed)
        if options is not None:
            directory = self.prepare_data(options)
            cmd += [f"--data.init_args.{split}_file={directory / f'{split}.json'}" for split in ("train", "val", "test")]
            cmd += ["--data.init_args.demo=false"]
        cmd += [f"--data.init_args.{k}={_fmt_arg(v)}" for k, v in a.data.items()]
        cmd += ["--data.init_args.seed=" + str(a.seed)]
        if a.start_from and name != a.start_from:
            cmd += [f"--model.init_args.init_from={self.start_checkpoint()}", *a.start_from_args]
        return cmd + list(a.fit_args)

    def start_checkpoint(self) -> Path:
        return self.out_dir / self.args.start_from / "fit" / "checkpoints" / "last.ckpt"

    def commands(self, name: str, config: Path) -> dict[str, Any]:
        """What a finished run is compared against on a rerun (the test's checkpoint is only known later)."""
        commands: dict[str, Any] = {"fit": self.fit_command(name, config), "test": self.test_command(name, config, None),
                                    "test_checkpoint": self.args.eval.checkpoint}
        start = self.args.start_from
        if start and name != start:  # the start run's own finish: refitting it redoes this run
            commands["start_from"] = json.loads((self.out_dir / start / RESULT_NAME).read_text(encoding="utf-8"))["finished_at"]
        return commands

    def checkpoint(self, name: str) -> Path:
        ckpt_dir = self.out_dir / name / "fit" / "checkpoints"
        best = sorted(ckpt_dir.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime)
        last = sorted(ckpt_dir.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
        if self.args.eval.checkpoint == "best" and best:
            return best[-1]
        if last:
            return last[-1]
        if best:
            return best[-1]
        raise FileNotFoundError(f"{name}: no checkpoint in {ckpt_dir}; the fit config must save one (save_last: true)")

    def test_command(self, name: str, config: Path, checkpoint: Path | None) -> list[str]:
        a = self.args
        cmd = ["test", "--config", str(config), "--data", str(self.resolve(a.eval.config)),
               f"--data.init_args.test_file={self.test_file()}", "--data.init_args.demo=false",
               f"--seed_everything={a.seed}",
               f"--trainer.logger.init_args.save_dir={self.out_dir}", f"--trainer.logger.init_args.name={name}",
               "--trainer.logger.init_args.version=test", f"--trainer.default_root_dir={self.out_dir / name}",
               "--trainer.enable_progress_bar=false"]
        if checkpoint is not None:
            cmd.append(f"--ckpt_path={checkpoint}")
        return cmd + list(a.eval.args)

    def call(self, cmd: list[str], log_file: Path) -> tuple[float, float]:
        """Run `python -m lightning_meddpo CMD`; (wall seconds, CPU seconds of the subprocess)."""
        start, cpu_start = time.perf_counter(), _children_cpu()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("w", encoding="utf-8") as f:
            f.write(" ".join([self.args.python, "-m", "lightning_meddpo", *cmd]) + "\n\n")
            f.flush()
            proc = subprocess.run([self.args.python, "-m", "lightning_meddpo", *cmd], stdout=f, stderr=subprocess.STDOUT,
                                  env=env, cwd=os.getcwd())
        if proc.returncode != 0:
            tail = log_file.read_text(encoding="utf-8", errors="replace")[-4000:]
            raise RuntimeError(f"`{cmd[0]}` failed ({proc.returncode}); full log: {log_file}\n{tail}")
        return time.perf_counter() - start, _children_cpu() - cpu_start

    def finished(self, name: str, commands: dict[str, list[str]]) -> dict[str, Any] | None:
        path = self.out_dir / name / RESULT_NAME
        if self.args.force or not path.is_file():
            return None
        result = json.loads(path.read_text(encoding="utf-8"))
        if result.get("commands") != commands:
            print(f"[{name}] settings changed since the finished run: redoing it")
            return None
        return result

    def run(self, name: str, config_path: str) -> dict[str, Any]:
        config = self.resolve(config_path)
        commands = self.commands(name, config)
        fit_cmd = commands["fit"]
        done = self.finished(name, commands)
        if done is not None:
            print(f"[{name}] finished earlier: skipped ({self.out_dir / name / RESULT_NAME})")
            return done
        run_dir = self.out_dir / name
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an unfinished or outdated run: start clean
        print(f"[{name}] fit {config}", flush=True)
        fit_seconds, fit_cpu = self.call(fit_cmd, run_dir / "fit.log")
        checkpoint = self.checkpoint(name)
        print(f"[{name}] test {checkpoint.name} ({fit_seconds:.0f} s fit)", flush=True)
        test_seconds, test_cpu = self.call(self.test_command(name, config, checkpoint), run_dir / "test.log")
        result = {
            "name": name, "config": config_path, "commands": commands, "checkpoint": str(checkpoint),
            "fit_seconds": fit_seconds, "test_seconds": test_seconds, "fit_cpu_seconds": fit_cpu, "test_cpu_seconds": test_cpu,
            **collect_metrics(run_dir), "checkpoint_step": checkpoint_step(checkpoint), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        tmp = run_dir / f".{RESULT_NAME}.tmp"
        tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, run_dir / RESULT_NAME)  # written last: marks the run finished
        print(f"[{name}] done in {fit_seconds + test_seconds:.0f} s: "
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


def collect_metrics(run_dir: Path) -> dict[str, Any]:
    """test/* from the test run, final val/* and the step count from the fit (TensorBoard event files)."""
    from lightning_meddpo.eval.tensorboard import read_scalars

    fit = read_scalars(run_dir / "fit")
    test = read_scalars(run_dir / "test")
    metrics = {tag.removeprefix("test/"): _last(series) for tag, series in test.items() if tag.startswith("test/")}
    metrics["val_reward_accuracy"] = _last(fit.get("val/rewards/accuracies"))
    metrics["val_reward_margin"] = _last(fit.get("val/rewards/margins"))
    metrics["val_loss"] = _last(fit.get("val/loss"))
    # Lightning logs val/* and `epoch` at the last step: the number of optimizer steps trained.
    steps = max((step for series in fit.values() for step, _ in series), default=-1) + 1
    return {"metrics": {k: v for k, v in metrics.items() if not math.isnan(v)}, "steps": steps}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    names = list(args.formulations)
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            raise SystemExit(f"--only names {unknown} that are not in formulations {names}")
        names = [n for n in names if n in args.only]
    runner = Runner(args)
    missing = {n: args.formulations[n] for n in names if not runner.resolve(args.formulations[n]).is_file()}
    if missing:
        raise SystemExit(f"fit configs not found: {missing} (paths are relative to the current directory)")
    if args.start_from:
        if args.start_from not in args.formulations:
            raise SystemExit(f"start_from {args.start_from!r} is not in formulations {list(args.formulations)}")
        if args.start_from in names:
            names = [args.start_from] + [n for n in names if n != args.start_from]  # it runs first
        elif not (runner.out_dir / args.start_from / RESULT_NAME).is_file():
            raise SystemExit(f"start_from {args.start_from!r} has no finished run in {runner.out_dir}: include it in --only")
    runner.out_dir.mkdir(parents=True, exist_ok=True)
    (runner.out_dir / "formulations.json").write_text(json.dumps(names) + "\n", encoding="utf-8")
    start = time.perf_counter()
    results = [runner.run(name, args.formulations[name]) for name in names]
    paths = write_summary(runner.out_dir, args.baseline if args.baseline in names else None)
    cpu = sum(r.get("fit_cpu_seconds", 0) + r.get("test_cpu_seconds", 0) for r in results)
    print(f"benchmark: {len(results)} runs in {time.perf_counter() - start:.0f} s (this invocation); "
          f"fits and tests took {cpu:.0f} CPU seconds in all; {paths['md']}")
    print(paths["md"].read_text(encoding="utf-8"))
    if args.plots:
        write_plots(runner.out_dir, args.baseline if args.baseline in names else None)
    return results


def write_plots(out_dir: Path, baseline: str | None) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("matplotlib is not installed: no plots written (pip install matplotlib, or --plots false)")
        return
    from lightning_meddpo.eval.report import load_results

    rows, columns = summary_rows(load_results(out_dir), baseline)
    plot_metrics(rows, columns, baseline, out_dir / "metrics.png")
    plot_curves(training_curves(out_dir, [r["formulation"] for r in rows]), out_dir / "curves.png")
    print(f"plots: {out_dir / 'metrics.png'}, {out_dir / 'curves.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
