"""`benchmark --launcher slurm` on a fake Slurm (tests/fake_slurm.py: sbatch, sacct, srun on PATH): a 2-run demo
grid submitted through submitit, the sbatch scripts carrying the config's resources, the finishing job depending on
its fit, a failed run resubmitted by a rerun while the finished one is skipped, the summary of what finished."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, run_program
from tests.fake_slurm import install, wait_for_jobs

pytest.importorskip("submitit")

SLURM = {"partition": "gpu", "time_min": 30, "account": "lab", "sbatch": {"comment": "meddpo-grid"},
         "eval": {"time_min": 10}}


def benchmark(out_dir: Path, capsys) -> str:
    """The runner, in this process (through the CLI's parser and dispatch): what it printed."""
    args = [
        f"--out_dir={out_dir}", "--backbone=configs/backbones/demo.yaml",
        '--formulations={"dpo": "configs/formulations/dpo.yaml", "ipo": "configs/formulations/ipo.yaml"}', "--baseline=dpo",
        "--seeds=[0]", "--bootstrap=50", "--plots=false", '--trainer={"max_steps": 2, "log_every_n_steps": 1}',
        '--demo_sizes={"n_train": 16, "n_val": 4, "n_test": 4}', "--eval.args=[--data.init_args.generation.max_new_tokens=2]",
        "--launcher=slurm", f"--slurm={json.dumps(SLURM)}",
    ]
    capsys.readouterr()
    run_program("benchmark", args)
    return capsys.readouterr().out


def test_the_grid_runs_as_slurm_jobs_and_a_rerun_resubmits_only_what_failed(tmp_path, monkeypatch, capsys):
    state = tmp_path / "slurm-state"
    for key, value in install(tmp_path / "bin", state).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the jobs run the package from this checkout
    monkeypatch.chdir(REPO)
    out_dir = tmp_path / "grid"

    monkeypatch.setenv("FAKE_SLURM_FAIL", "ipo-s0-fit")  # ipo's fit fails (a lost node, say)
    first = benchmark(out_dir, capsys)
    monkeypatch.delenv("FAKE_SLURM_FAIL")
    assert "2 submitted now" in first and "missing from the summary" in first
    states = wait_for_jobs(state)
    scripts = {int(p.stem): p.read_text() for p in state.glob("*.sbatch")}
    assert len(scripts) == 4
    assert states == {"1": "COMPLETED", "2": "COMPLETED", "3": "FAILED", "4": "CANCELLED"}, states
    fit, finish = scripts[1], scripts[2]
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=30", "#SBATCH --account=lab", "#SBATCH --nodes=1",
                 "#SBATCH --comment=meddpo-grid", "#SBATCH --signal=USR1@120", "#SBATCH --job-name=dpo-s0-fit"):
        assert line in fit, line
    assert "#SBATCH --dependency=afterok:1" in finish and "#SBATCH --time=10" in finish  # the eval's own time
    assert "#SBATCH --dependency=afterok:3" in scripts[4]
    fit_log = (out_dir / "dpo" / "seed_0" / "fit.log").read_text()
    assert fit_log.startswith("srun --kill-on-bad-exit=1 ") and "--ckpt_path=last" in fit_log.splitlines()[0]
    assert (out_dir / "dpo" / "seed_0" / "result.json").is_file()
    assert not (out_dir / "ipo" / "seed_0" / "result.json").exists()

    second = benchmark(out_dir, capsys)  # the runner again: dpo finished, ipo's jobs ended without a result
    assert "ipo seed 0] jobs ended without a result (fit FAILED, finish CANCELLED): resubmitting" in second
    assert "1 finished, 0 in flight, 1 submitted now" in second
    states = wait_for_jobs(state)
    assert len(states) == 6 and states["5"] == states["6"] == "COMPLETED"
    assert "#SBATCH --job-name=ipo-s0-fit" in (state / "5.sbatch").read_text()

    third = benchmark(out_dir, capsys)
    assert "2 finished, 0 in flight, 0 submitted now, 0 waiting" in third and "missing" not in third
    assert len(list(state.glob("*.sbatch"))) == 6  # nothing resubmitted
    summary = (out_dir / "summary.md").read_text()
    assert "| **dpo** |" in summary and "| ipo |" in summary
