"""A fake Slurm for tests: `sbatch`, `sacct`, `srun`, `scontrol` and `squeue` scripts written into a folder that a
test puts first on PATH. `sbatch` keeps the script (`<state>/<id>.sbatch`), prints "Submitted batch job <id>" and
runs the job in the background once its `afterok` dependencies have completed (a failed dependency cancels it), with
the SLURM_* variables of a one-task job and its output where `#SBATCH --output/--error` say; `sacct` reports the
states (`<state>/<id>.state`). Jobs whose name is listed in $FAKE_SLURM_FAIL fail without running."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

SBATCH = r'''
import json, os, re, subprocess, sys
from pathlib import Path
state = Path(os.environ["FAKE_SLURM_DIR"])
script = Path(sys.argv[-1]).read_text()
counter = state / "counter"
job = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(job))
(state / f"{job}.sbatch").write_text(script)
(state / f"{job}.state").write_text("PENDING")
subprocess.Popen([sys.executable, os.environ["FAKE_SLURM_JOB"], str(job)], start_new_session=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=os.getcwd(), env=os.environ)
print(f"Submitted batch job {job}")
'''

JOB = r'''
import json, os, re, subprocess, sys, time
from pathlib import Path
state = Path(os.environ["FAKE_SLURM_DIR"])
job = sys.argv[1]
script_path = state / f"{job}.sbatch"
script = script_path.read_text()
flags = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, re.M))

def state_of(other):
    path = state / f"{other}.state"
    return path.read_text() if path.exists() else None

def set_state(value):
    tmp = state / f"{job}.state.tmp"
    tmp.write_text(value)
    os.replace(tmp, state / f"{job}.state")

for dep in (flags.get("dependency") or "").split(",")[:1]:
    for other in dep.split(":")[1:]:
        while state_of(other) in ("PENDING", "RUNNING"):
            time.sleep(0.2)
        if state_of(other) != "COMPLETED":
            set_state("CANCELLED")
            sys.exit(0)
if flags.get("job-name") in os.environ.get("FAKE_SLURM_FAIL", "").split(","):
    set_state("FAILED")
    sys.exit(0)
folder = Path(flags["output"].replace("%j", job)).parent
deadline = time.time() + 60
while not list(folder.glob(f"{job}_submitted.pkl")) and time.time() < deadline:  # submitit renames it after sbatch
    time.sleep(0.1)
set_state("RUNNING")
env = {**os.environ, "SLURM_JOB_ID": job, "SLURM_JOB_NAME": flags.get("job-name", "job"), "SLURM_NTASKS": "1",
       "SLURM_NNODES": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODELIST": "localhost", "SLURM_JOB_NODELIST": "localhost",
       "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
with open(flags["output"].replace("%j", job), "a") as out, open(flags.get("error", flags["output"]).replace("%j", job), "a") as err:
    code = subprocess.run(["bash", str(script_path)], env=env, stdout=out, stderr=err).returncode
set_state("COMPLETED" if code == 0 else "FAILED")
'''

SACCT = r'''
import os, sys
from pathlib import Path
state = Path(os.environ["FAKE_SLURM_DIR"])
ids = [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "-j"]
print("JobID|State|NodeList")
for job in ids:
    if (state / f"{job}.state").exists():
        print(f"{job}|{(state / f'{job}.state').read_text()}|localhost")
'''

SRUN = r'''
import os, sys
args = sys.argv[1:]
while args and args[0].startswith("-"):
    args.pop(0)
os.execvp(args[0], args)
'''


def install(bin_dir: Path, state_dir: Path) -> dict[str, str]:
    """Write the fake tools into `bin_dir`; the environment a test runs the runner with."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    job = bin_dir / "fake_job.py"
    job.write_text(JOB)
    for name, body in (("sbatch", SBATCH), ("sacct", SACCT), ("srun", SRUN)):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(0o755)
    for name in ("scontrol", "squeue"):
        path = bin_dir / name
        path.write_text("#!/bin/sh\necho \"$0 $*\" >> \"$FAKE_SLURM_DIR/calls.log\"\n")
        path.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(state_dir),
            "FAKE_SLURM_JOB": str(job)}


def wait_for_jobs(state_dir: Path, timeout: float = 600) -> dict[str, str]:
    """Block until no fake job is pending or running; the states."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = {p.name.removesuffix(".state"): p.read_text() for p in state_dir.glob("*.state")}
        if not any(s in ("PENDING", "RUNNING") for s in states.values()):
            return states
        time.sleep(0.5)
    raise TimeoutError(f"fake Slurm jobs still running after {timeout} s: {states}")
