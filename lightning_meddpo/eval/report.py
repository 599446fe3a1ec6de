"""Benchmark results: the comparison table (CSV, Markdown) and plots (metric bars, training curves).

Used by the benchmark runner (`eval/benchmark.py`) and by notebooks/benchmark_report.ipynb. A finished
run directory `<out_dir>/<formulation>/` holds `result.json` (written last by the runner: the run's
metrics, timings and settings), `fit/` (TensorBoard events, checkpoints) and `test/` (events,
predictions.jsonl). Everything here reads those files only; matplotlib is imported when plotting.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

RESULT_NAME = "result.json"

# Column order of the table: generation metrics first, then the training-side ones.
METRIC_ORDER = (
    "closed_accuracy", "closed_accuracy_strict", "closed_accuracy_run_eval", "open_recall", "open_recall_clipped",
    "open_exact_match", "open_f1",
    "bleu", "rouge_l", "nli/completeness", "nli/hallucination", "val_reward_accuracy", "val_reward_margin", "val_loss",
)
# Training curves plotted by default: (TensorBoard tag, title).
CURVES = (
    ("train/loss_step", "train loss"),
    ("val/loss", "val loss"),
    ("val/rewards/accuracies", "val reward accuracy"),
    ("val/rewards/margins", "val reward margin"),
)
LOWER_IS_BETTER = {"val_loss", "nli/hallucination"}
# Each formulation's loss is a different function, and SFT's "reward" margin is a per-token log-prob
# margin while DPO's is beta-scaled: shown per run, but no delta to the baseline and no bars.
NOT_COMPARABLE = {"val_loss", "val_reward_margin"}


def load_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """The result.json of every finished run under `out_dir`, in the order the runner recorded (or by name)."""
    out_dir = Path(out_dir)
    order_file = out_dir / "formulations.json"
    names = json.loads(order_file.read_text()) if order_file.is_file() else sorted(p.name for p in out_dir.iterdir() if p.is_dir())
    results = []
    for name in names:
        path = out_dir / name / RESULT_NAME
        if path.is_file():
            results.append(json.loads(path.read_text(encoding="utf-8")))
    return results


def metric_columns(results: list[dict[str, Any]]) -> list[str]:
    present = {k for r in results for k in r.get("metrics", {})}
    known = [m for m in METRIC_ORDER if m in present]
    return known + sorted(present - set(known))


def summary_rows(results: list[dict[str, Any]], baseline: str | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per formulation: every metric and, when the baseline ran, `delta_<metric>` to it."""
    columns = metric_columns(results)
    base = next((r for r in results if r["name"] == baseline), None)
    rows = []
    for r in results:
        row: dict[str, Any] = {"formulation": r["name"], "config": r.get("config", "")}
        for m in columns:
            row[m] = r["metrics"].get(m, math.nan)
        for m in columns:
            b = base["metrics"].get(m, math.nan) if base and m not in NOT_COMPARABLE else math.nan
            row[f"delta_{m}"] = row[m] - b
        row["steps"] = r.get("steps")
        row["checkpoint_step"] = r.get("checkpoint_step")
        row["fit_seconds"] = r.get("fit_seconds")
        row["test_seconds"] = r.get("test_seconds")
        row["cpu_seconds"] = (r.get("fit_cpu_seconds") or 0) + (r.get("test_cpu_seconds") or 0) or None
        rows.append(row)
    return rows, columns


def to_csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def _fmt(value: Any, delta: Any = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = f"{value:.3f}"
    if delta is not None and not (isinstance(delta, float) and math.isnan(delta)):
        text += f" ({delta:+.3f})"
    return text


def to_markdown(rows: list[dict[str, Any]], columns: list[str], baseline: str | None = None) -> str:
    """A Markdown table: value (delta to the baseline) per metric; the baseline row shows plain values."""
    if not rows:
        return "(no finished runs)\n"
    head = ["formulation", *columns, "steps", "fit s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        is_base = row["formulation"] == baseline
        cells = [f"**{row['formulation']}**" if is_base else row["formulation"]]
        cells += [_fmt(row[m], None if is_base else row[f"delta_{m}"]) for m in columns]
        cells += [str(row.get("steps") or "–"), f"{row['fit_seconds']:.0f}" if row.get("fit_seconds") else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    note = f"\nIn parentheses: difference to the baseline **{baseline}**. " if baseline else "\n"
    note += ("val_* are the final epoch's validation values of the fit (val_loss and val_reward_margin differ in "
             "definition between formulations: no delta); the others are from `test` on the held-out questions.\n")
    return "\n".join(lines) + "\n" + note


def write_summary(out_dir: str | Path, baseline: str | None = None) -> dict[str, Path]:
    """summary.csv and summary.md from the finished runs under out_dir."""
    out_dir = Path(out_dir)
    rows, columns = summary_rows(load_results(out_dir), baseline)
    paths = {"csv": out_dir / "summary.csv", "md": out_dir / "summary.md"}
    paths["csv"].write_text(to_csv(rows), encoding="utf-8")
    paths["md"].write_text(f"# Benchmark {out_dir.name}\n\n" + to_markdown(rows, columns, baseline), encoding="utf-8")
    return paths


def training_curves(out_dir: str | Path, names: list[str] | None = None) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """formulation -> TensorBoard tag -> [(step, value)] of its fit, read back from the event files."""
    from lightning_meddpo.eval.tensorboard import read_scalars

    out_dir = Path(out_dir)
    names = names if names is not None else [r["name"] for r in load_results(out_dir)]
    return {name: read_scalars(out_dir / name / "fit") for name in names if (out_dir / name / "fit").is_dir()}


def plot_metrics(rows: list[dict[str, Any]], columns: list[str], baseline: str | None = None, path: str | Path | None = None):
    """One bar chart per metric (bars: formulations; dashed line: the baseline). Returns the figure."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    columns = [c for c in columns if c not in NOT_COMPARABLE and any(not math.isnan(r[c]) for r in rows)]
    n = max(1, len(columns))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    names = [r["formulation"] for r in rows]
    for ax, metric in zip(axes.flat, columns):
        values = [r[metric] for r in rows]
        colors = ["tab:gray" if name == baseline else "tab:blue" for name in names]
        ax.bar(range(len(names)), [0 if math.isnan(v) else v for v in values], color=colors)
        base = next((r[metric] for r in rows if r["formulation"] == baseline), math.nan)
        if not math.isnan(base):
            ax.axhline(base, color="black", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        arrow = " (lower is better)" if metric in LOWER_IS_BETTER else ""
        ax.set_title(metric + arrow, fontsize=9)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig


def plot_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], path: str | Path | None = None,
                tags: tuple[tuple[str, str], ...] = CURVES):
    """Training curves of every formulation, one panel per tag. Returns the figure."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    tags = tuple((t, title) for t, title in tags if any(t in c for c in curves.values())) or tags
    fig, axes = plt.subplots(1, len(tags), figsize=(4.2 * len(tags), 3.2), squeeze=False)
    for ax, (tag, title) in zip(axes.flat, tags):
        for name, series in curves.items():
            if tag in series:
                steps, values = zip(*series[tag])
                ax.plot(steps, values, label=name, marker="." if len(steps) < 20 else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=8)
        fig.tight_layout(rect=(0, 0, 0.85, 1))
    else:
        fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig


__all__ = ["CURVES", "METRIC_ORDER", "RESULT_NAME", "load_results", "plot_curves", "plot_metrics", "summary_rows",
           "to_csv", "to_markdown", "training_curves", "write_summary"]
