"""notebooks/benchmark_report.ipynb executes headless on a small finished benchmark (BENCHMARK_DIR)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_benchmark import finished_benchmark  # noqa: F401  (a rerun there skips every finished run)

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "benchmark_report.ipynb"


def test_notebook_executes(finished_benchmark, monkeypatch):  # noqa: F811
    monkeypatch.setenv("BENCHMARK_DIR", str(finished_benchmark))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") for o in outputs)
    assert f"4 finished runs in {finished_benchmark}; baseline: sft; seeds [0, 1]" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # the error bars, the metric bars and the training curves
    html = "\n".join(o.get("data", {}).get("text/html", "") for o in outputs)
    for column in ("closed_accuracy", "acc/side", "err/visual", "err/missed_lesion", "image-blind", "laterality"):
        assert column in html, column
    assert " ± " in html and "[" in html  # std and interval in the score cells
