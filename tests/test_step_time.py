"""benchmarks/step_time.py runs as a script and reports what it measured (behaviour, not speed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO, small_demo_args


def test_step_time_script_reports_timing_and_memory(demo_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "step_time.py"), "--config", "configs/formulations/dpo.yaml", "--config", "configs/backbones/demo.yaml",
         "--steps", "4", "--warmup", "1", "--", *small_demo_args(demo_dir, tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["steps_timed"] == 3 and result["strategy"] == "SingleDeviceStrategy"
    assert result["seconds_per_step_median"] > 0 and result["pairs_per_second"] > 0 and result["tokens_per_second"] > 0
    assert result["peak_memory_mib_process_max_rss"] > 0
