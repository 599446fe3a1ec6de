"""`benchmark --launcher slurm`: the grid as Slurm jobs through submitit; the runner submits, exits, and is rerun.

    pip install -e ".[cluster]"
    python -m lightning_meddpo benchmark --config configs/benchmark/llava_med.yaml --launcher slurm \\
        --slurm '{partition: gpu, nodes: 1, gpus_per_node: 8, time_min: 1440, account: my_lab}'

Each (formulation, seed) is two jobs, submitted with submitit's SlurmExecutor:
- the fit: `srun python -m lightning_meddpo fit ... --ckpt_path last` with one task per GPU (Lightning's
  SLURMEnvironment reads the ranks from srun) and `--trainer.num_nodes` / `--trainer.devices` from the resources;
  `#SBATCH --signal=USR1@120` has Slurm signal the fit 120 s before the time limit, and the Preemption callback (in
  the backbone configs) saves last.ckpt, requeues the job and exits: the requeued job resumes from it;
- the finish (`--dependency=afterok:<fit>`, its own resources under `eval:`, one GPU by default): tests the run's
  checkpoint on every evaluation and writes result.json, which marks the run finished (Runner.finish).

The runner keeps `<run>/slurm.json` (the job ids and the commands). A rerun reads the jobs' states (sacct, through
submitit): a finished run with the same commands is skipped, a run whose jobs are pending or running is left to
them, a failed, cancelled, timed-out or lost one is resubmitted (its fit resumes from last.ckpt), and a run whose
settings changed starts over. The summary is then written from whatever has finished, and what is missing is named.
With `start_from`, the runs that start from it are submitted once it has finished (rerun the benchmark then).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from lightning_meddpo.checkpoints import write_text_atomic
from lightning_meddpo.commands.report import RESULT_NAME, write_summary

STATE_FILE = "slurm.json"
IN_FLIGHT = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "REQUEUE_HOLD",
             "REQUEUE_FED", "STAGE_OUT", "SIGNALING"}
RESOURCE_KEYS = {"partition", "nodes", "gpus_per_node", "time_min", "account", "cpus_per_task", "mem_gb", "sbatch",
                 "setup", "eval", "qos", "constraint"}
PREEMPT_SIGNAL = "USR1@120"  # the Preemption callback's signal, 120 s before the time limit


def executor(folder: Path, resources: dict[str, Any], job_name: str, dependency: str | None = None):
    """A submitit SlurmExecutor for one job: `resources` as the grid config gives them (RESOURCE_KEYS)."""
    try:
        import submitit
    except ImportError as e:
        raise ValueError("launcher: slurm needs submitit: pip install -e '.[cluster]'") from e
    unknown = sorted(set(resources) - RESOURCE_KEYS)
    if unknown:
        raise ValueError(f"slurm: unknown keys {unknown}; known: {sorted(RESOURCE_KEYS)}")
    gpus = int(resources.get("gpus_per_node") or 0)
    params: dict[str, Any] = {
        "job_name": job_name, "nodes": int(resources.get("nodes") or 1), "ntasks_per_node": max(1, gpus),
        "time": int(resources.get("time_min") or 60), "use_srun": False,  # the job's command runs srun itself
        "additional_parameters": {"signal": PREEMPT_SIGNAL, **(resources.get("sbatch") or {})},
    }
    if gpus:
        params["gpus_per_node"] = gpus
    for ours, theirs in (("partition", "partition"), ("account", "account"), ("cpus_per_task", "cpus_per_task"),
                         ("qos", "qos"), ("constraint", "constraint"), ("setup", "setup")):
        if resources.get(ours) is not None:
            params[theirs] = resources[ours]
    if resources.get("mem_gb") is not None:
        params["mem"] = f"{resources['mem_gb']}GB"
    if dependency:
        params["dependency"] = dependency
    ex = submitit.SlurmExecutor(folder=str(folder))
    ex.update_parameters(**params)
    return ex


def fit_job(runner, name: str, seed: int) -> None:
    """The fit job's body (runs in the job): `srun python -m lightning_meddpo fit ... --ckpt_path last`."""
    configs = runner.configs(name)
    resources = runner.args.slurm
    cmd = runner.fit_command(name, configs, seed) + trainer_size(resources) + ["--ckpt_path=last"]
    runner.call(cmd, runner.run_dir(name, seed) / "fit.log", launch=["srun", "--kill-on-bad-exit=1"])


def finish_job(runner, name: str, seed: int) -> None:
    """The finishing job's body: test the checkpoint on every evaluation, write result.json."""
    configs = runner.configs(name)
    runner.finish(name, seed, configs, run_commands(runner, name, configs, seed), None, None)


def run_commands(runner, name: str, configs: list[Path], seed: int) -> dict[str, Any]:
    """What a finished run is compared against on a rerun: the runner's commands and the job's size."""
    return {**runner.commands(name, configs, seed), "launch": trainer_size(runner.args.slurm)}


def trainer_size(resources: dict[str, Any]) -> list[str]:
    """Lightning's nodes and devices per node, as the job's resources give them (GPUs: one task per GPU)."""
    gpus = int(resources.get("gpus_per_node") or 0)
    size = [f"--trainer.num_nodes={int(resources.get('nodes') or 1)}"]
    return size + ([f"--trainer.devices={gpus}", "--trainer.accelerator=gpu"] if gpus else [])


def job_states(folder: Path, jobs: dict[str, str]) -> dict[str, str]:
    """role -> Slurm state (sacct through submitit) of a run's jobs."""
    import submitit

    return {role: submitit.SlurmJob(folder=str(folder), job_id=job_id).state for role, job_id in jobs.items()}


def submit(runner, name: str, seed: int, commands: dict[str, Any], folder: Path) -> dict[str, str]:
    """Submit a run's fit and its finishing job (afterok on the fit); record them in <run>/slurm.json."""
    resources = dict(runner.args.slurm)
    finish_resources = {"nodes": 1, "gpus_per_node": 1 if resources.get("gpus_per_node") else 0,
                        **{k: v for k, v in resources.items() if k not in ("nodes", "gpus_per_node", "eval")},
                        **(resources.get("eval") or {})}
    fit = executor(folder, {k: v for k, v in resources.items() if k != "eval"}, f"{name}-s{seed}-fit").submit(
        fit_job, runner, name, seed)
    finish = executor(folder, finish_resources, f"{name}-s{seed}-finish", dependency=f"afterok:{fit.job_id}").submit(
        finish_job, runner, name, seed)
    jobs = {"fit": str(fit.job_id), "finish": str(finish.job_id)}
    state = {"commands": commands, "jobs": jobs, "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_text_atomic(runner.run_dir(name, seed) / STATE_FILE, json.dumps(state, indent=1) + "\n", "the run's Slurm jobs")
    print(f"[{name} seed {seed}] submitted: fit job {jobs['fit']}, then job {jobs['finish']} (tests, result)", flush=True)
    return jobs


def run_on_slurm(runner, names: list[str], seeds: list[int]) -> list[dict[str, Any]]:
    """Submit every run that is neither finished nor in flight; write the summary of the finished ones."""
    folder = runner.out_dir / "slurm"
    status: dict[str, list[str]] = {"finished": [], "in flight": [], "submitted": [], "waiting": []}
    for seed in seeds:
        for name in names:
            label = f"{name} seed {seed}"
            if runner.args.start_from and name != runner.args.start_from and not (
                    runner.run_dir(runner.args.start_from, seed) / RESULT_NAME).is_file():
                status["waiting"].append(f"{label} (starts from {runner.args.start_from}, not finished yet)")
                continue
            configs = runner.configs(name)
            commands = run_commands(runner, name, configs, seed)
            if runner.finished(name, seed, commands) is not None:
                status["finished"].append(label)
                continue
            run_dir = runner.run_dir(name, seed)
            previous = _read_state(run_dir / STATE_FILE)
            if previous and previous.get("commands") == commands:
                states = job_states(folder, previous["jobs"])
                if any(s in IN_FLIGHT for s in states.values()):
                    status["in flight"].append(f"{label} ({', '.join(f'{r} {s}' for r, s in states.items())})")
                    continue
                print(f"[{label}] jobs ended without a result ({', '.join(f'{r} {s}' for r, s in states.items())}): "
                      "resubmitting (the fit resumes from its last.ckpt)", flush=True)
            elif run_dir.exists():
                shutil.rmtree(run_dir)  # another config, or a run from the local launcher: start clean
            submit(runner, name, seed, commands, folder)
            status["submitted"].append(label)
    missing = [x for key in ("in flight", "submitted", "waiting") for x in status[key]]
    results = [r for r in (_read_state(runner.run_dir(n, s) / RESULT_NAME) for s in seeds for n in names) if r]
    if results:
        baseline = runner.args.baseline if runner.args.baseline in names else None
        paths = write_summary(runner.out_dir, baseline, bootstrap=runner.args.bootstrap)
        print(f"summary of the {len(results)} finished runs: {paths['md']}")
    print(f"benchmark (slurm): {len(status['finished'])} finished, {len(status['in flight'])} in flight, "
          f"{len(status['submitted'])} submitted now, {len(status['waiting'])} waiting"
          + ("; missing from the summary: " + "; ".join(missing) if missing else "")
          + ("; rerun this command to collect them" if missing else ""))
    return results


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
