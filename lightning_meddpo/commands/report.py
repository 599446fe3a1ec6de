"""Benchmark results: per-question scores, seed statistics with bootstrap intervals, the error analysis, the
comparison tables (CSV, Markdown) and plots.

Used by the benchmark runner (`commands/benchmark.py`) and by notebooks/benchmark_report.ipynb. A finished run
`<out_dir>/<formulation>/seed_<s>/` holds `result.json` (written last by the runner: metrics, timings,
settings, the test files), `fit/` (TensorBoard events, checkpoints) and `test[_<eval>]/` (events,
predictions.jsonl). Everything here reads those files only; matplotlib is imported when plotting.

Statistics (`summarize`). Every run of a benchmark answers the same questions, so a formulation's scores
form a seeds x questions matrix per metric (NaN where the metric does not apply: recall on a closed
question). Per metric it reports the mean over seeds and questions, the standard deviation of the per-seed
means, and a 95% percentile-bootstrap interval resampling seeds and questions (two-stage: seeds with
replacement, then questions with replacement, the same draw for every formulation). The difference to the
baseline is paired: the baseline's score is subtracted question by question within a seed, and the same
bootstrap draws give its interval (only the seeds both ran). An interval excluding 0 is marked `*`.

Per-question metrics are those of eval/metrics.py: closed_accuracy (LLaVA-Med's substring hit),
closed_accuracy_strict, open_recall (LLaVA-Med's recall), open_recall_clipped, open_exact_match, open_f1,
rouge_l (reports), plus `acc/<question_type>` (the error analysis says "correct"; demo questions only) and
`err/<type>` (share of questions with that error type, eval/errors.py). Corpus-level metrics (bleu,
closed_accuracy_run_eval, nli/*) and the fit's val_* come from TensorBoard: mean and std over seeds only.

The image-blind row answers every question with the most common gold answer among the test questions with
the same text: the best any model that ignores the image can do on these questions (it uses the test golds,
so it is an upper bound for a blind model, not a trained one).
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_meddpo.checkpoints import write_text_atomic, writing
from lightning_meddpo.data.records import IMAGE_TOKEN, load_json_records
from lightning_meddpo.eval.errors import ERROR_TYPES, VISUAL_ERRORS, classify
from lightning_meddpo.eval.metrics import (
    closed_hit,
    exact_match,
    llava_med_f1,
    rouge_l,
    strict_closed_hit,
    token_f1,
    token_recall,
)

RESULT_NAME = "result.json"
IMAGE_BLIND = "image-blind"
SINGLE_EVAL = "test"  # the evaluation's name when the benchmark has one

# Per-question metrics: name -> (answer types it applies to, score(pred, gold)).
QUESTION_METRICS = {
    "closed_accuracy": ("CLOSED", lambda p, g: float(closed_hit(p, g))),
    "closed_accuracy_strict": ("CLOSED", lambda p, g: float(strict_closed_hit(p, g))),
    "open_recall": ("OPEN", lambda p, g: llava_med_f1(p, g)[2]),
    "open_recall_clipped": ("OPEN", token_recall),
    "open_exact_match": ("OPEN", lambda p, g: float(exact_match(p, g))),
    "open_f1": ("OPEN", token_f1),
    "rouge_l": ("REPORT", rouge_l),
}
# Metrics only the runs' logs have (corpus-level or from the fit): mean and std over seeds.
RUN_METRICS = ("closed_accuracy_run_eval", "bleu", "nli/completeness", "nli/hallucination",
               "val_reward_accuracy", "val_reward_margin", "val_loss")
ERROR_METRICS = (*(f"err/{t}" for t in ERROR_TYPES), "err/visual")
# Shown in the main table and the bar plot when present.
KEY_METRICS = ("closed_accuracy", "closed_accuracy_strict", "open_recall", "open_recall_clipped", "open_f1", "rouge_l")
CURVES = (
    ("train/loss_step", "train loss"),
    ("val/loss", "val loss"),
    ("val/rewards/accuracies", "val reward accuracy"),
    ("val/rewards/margins", "val reward margin"),
)
LOWER_IS_BETTER = {"val_loss", "nli/hallucination", "err/visual"} | {f"err/{t}" for t in ERROR_TYPES if t != "correct"}
# Each formulation's loss is a different function, and SFT's "reward" margin is a per-token log-prob margin
# while DPO's is beta-scaled: shown per run, no difference to the baseline.
NOT_COMPARABLE = {"val_loss", "val_reward_margin"}


# ---------------------------------------------------------------- reading finished runs
def load_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """The result.json of every finished run under `out_dir`: formulations in the runner's order, seeds ascending."""
    out_dir = Path(out_dir)
    order_file = out_dir / "formulations.json"
    names = (json.loads(order_file.read_text(encoding="utf-8")) if order_file.is_file()
             else sorted(p.name for p in out_dir.iterdir() if p.is_dir() and p.name != "data"))
    results = []
    for name in names:
        paths = sorted((out_dir / name).glob(f"seed_*/{RESULT_NAME}"), key=lambda p: int(p.parent.name.removeprefix("seed_")))
        results += [json.loads(p.read_text(encoding="utf-8")) for p in paths]
    return results


def run_dir(out_dir: str | Path, result: dict[str, Any]) -> Path:
    return Path(out_dir) / result["name"] / f"seed_{result['seed']}"


def eval_dir_name(evaluation: str) -> str:
    return "test" if evaluation == SINGLE_EVAL else f"test_{evaluation}"


def read_questions(test_file: str | Path) -> dict[str, dict[str, Any]]:
    """question id (as a string) -> the test file's record, for the ground-truth fields of the error analysis."""
    out = {}
    for _, raw in load_json_records(Path(test_file)):
        if isinstance(raw, dict) and raw.get("question_id", raw.get("id")) is not None:
            out[str(raw.get("question_id", raw.get("id")))] = raw
    return out


def question_text(prompt: str) -> str:
    return " ".join(prompt.replace(IMAGE_TOKEN, " ").split())


@dataclass
class Scored:
    """One run's per-question results on one evaluation: ids in file order, metric -> scores, error types."""

    ids: list[str]
    scores: dict[str, list[float]]
    errors: list[str | None]
    lexical: bool  # the error types were judged lexically (no ground-truth fields)
    predictions: list[str] = field(default_factory=list)


def score_rows(rows: list[dict[str, Any]], questions: dict[str, dict[str, Any]]) -> Scored:
    """Per-question scores and error types of prediction rows (predictions.jsonl), joined with their questions."""
    ids = [str(r["question_id"]) for r in rows]
    scores: dict[str, list[float]] = {m: [] for m in QUESTION_METRICS}
    errors: list[str | None] = []
    question_types: list[str | None] = []
    lexical = False
    for row in rows:
        pred, gold, atype = str(row["prediction"]), str(row["gold"]), row["answer_type"]
        for metric, (applies, fn) in QUESTION_METRICS.items():
            scores[metric].append(fn(pred, gold) if atype == applies else math.nan)
        error, qtype = None, None
        if atype != "REPORT":
            question = {**questions.get(str(row["question_id"]), {}), "gold": gold, "answer_type": atype}
            error, judged_lexically = classify(pred, question)
            lexical |= judged_lexically
            qtype = None if judged_lexically else question["question_type"]
        errors.append(error)
        question_types.append(qtype)
    for qtype in sorted(set(question_types) - {None}):
        scores[f"acc/{qtype}"] = [float(e == "correct") if t == qtype else math.nan for e, t in zip(errors, question_types)]
    if any(e is not None for e in errors):
        for error_type in ERROR_TYPES:
            scores[f"err/{error_type}"] = [math.nan if e is None else float(e == error_type) for e in errors]
        scores["err/visual"] = [math.nan if e is None else float(e in VISUAL_ERRORS) for e in errors]
    scores = {m: v for m, v in scores.items() if not all(math.isnan(x) for x in v)}
    return Scored(ids, scores, errors, lexical, [str(r["prediction"]) for r in rows])


def read_predictions(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def image_blind_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with each prediction replaced by the most common gold among questions of the same text
    (ties: the alphabetically first answer, so the row is deterministic)."""
    by_text: dict[str, Counter] = defaultdict(Counter)
    for row in rows:
        by_text[question_text(row["prompt"])][str(row["gold"])] += 1
    majority = {text: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for text, c in by_text.items()}
    return [{**row, "prediction": majority[question_text(row["prompt"])]} for row in rows]


# ---------------------------------------------------------------- statistics
def _nanmean(x: np.ndarray, axis=None) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def bootstrap_draws(n_seeds: int, n_questions: int, resamples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(seed indices [B, S], question indices [B, Q]): one two-stage resample per row."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_seeds, size=(resamples, n_seeds)), rng.integers(0, n_questions, size=(resamples, n_questions))


def matrix_stats(x: np.ndarray, draws: tuple[np.ndarray, np.ndarray] | None) -> dict[str, float]:
    """mean, std of the per-seed means (ddof 1; NaN for one seed), 95% bootstrap interval of a [S, Q] matrix."""
    per_seed = _nanmean(x, axis=1)
    out = {"mean": float(_nanmean(per_seed)), "std": float(np.nanstd(per_seed, ddof=1)) if len(per_seed) > 1 else math.nan,
           "low": math.nan, "high": math.nan}
    if draws is not None and np.isfinite(x).any():
        seeds, questions = draws
        boot = _nanmean(x[seeds[:, :, None], questions[:, None, :]], axis=(1, 2))
        boot = boot[np.isfinite(boot)]
        if len(boot):
            out["low"], out["high"] = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
    return out


@dataclass
class Summary:
    """`rows`: one per (formulation, evaluation, metric) with mean, std, low, high, delta, delta_low,
    delta_high, seeds, questions. `evaluations`: name -> {questions, lexical}."""

    rows: list[dict[str, Any]]
    formulations: list[str]
    evaluations: dict[str, dict[str, Any]]
    baseline: str | None
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # formulation -> {steps, fit_seconds, seeds}

    def value(self, formulation: str, evaluation: str, metric: str) -> dict[str, Any] | None:
        return next((r for r in self.rows if (r["formulation"], r["evaluation"], r["metric"])
                     == (formulation, evaluation, metric)), None)

    def metrics(self, evaluation: str) -> list[str]:
        seen = dict.fromkeys(r["metric"] for r in self.rows if r["evaluation"] == evaluation)
        order = {m: i for i, m in enumerate((*QUESTION_METRICS, *RUN_METRICS, *ERROR_METRICS))}
        return sorted(seen, key=lambda m: (m.startswith("acc/"), m.startswith("err/"), order.get(m, len(order)), m))


def summarize(results: list[dict[str, Any]], out_dir: str | Path, baseline: str | None = None,
              bootstrap: int = 1000) -> Summary:
    """Per-question scores of every finished run, aggregated per formulation (see the module docstring)."""
    out_dir = Path(out_dir)
    names = list(dict.fromkeys(r["name"] for r in results))
    baseline = baseline if baseline in names else None
    evaluations = list(dict.fromkeys(e for r in results for e in r.get("test_files", {SINGLE_EVAL: None})))
    rows: list[dict[str, Any]] = []
    eval_info: dict[str, dict[str, Any]] = {}
    for evaluation in evaluations:
        scored: dict[str, dict[int, Scored]] = defaultdict(dict)
        blind = None
        for r in results:
            path = run_dir(out_dir, r) / eval_dir_name(evaluation) / "predictions.jsonl"
            if not path.is_file():
                continue
            test_file = r.get("test_files", {}).get(evaluation)
            questions = read_questions(test_file) if test_file and Path(test_file).is_file() else {}
            preds = read_predictions(path)
            scored[r["name"]][r["seed"]] = score_rows(preds, questions)
            if blind is None:
                blind, first = score_rows(image_blind_rows(preds), questions), f"{r['name']} seed {r['seed']}"
        if blind is None:
            continue
        ids = blind.ids
        for name, by_seed in scored.items():
            for seed, s in by_seed.items():
                if sorted(s.ids) != sorted(ids):
                    raise ValueError(f"{name} seed {seed} and {first} answered different questions on {evaluation} "
                                     f"({len(s.ids)} and {len(ids)} ids): runs cannot be compared")
        eval_info[evaluation] = {"questions": len(ids), "lexical": blind.lexical}
        all_seeds = sorted({seed for by_seed in scored.values() for seed in by_seed})
        draws_by_n = {n: bootstrap_draws(n, len(ids), bootstrap, seed=n) if bootstrap > 0 else None
                      for n in range(1, len(all_seeds) + 1)}

        def matrix(by_seed: dict[int, Scored], metric: str, seeds: list[int]) -> np.ndarray:
            out = np.full((len(seeds), len(ids)), np.nan)
            for i, seed in enumerate(seeds):
                s = by_seed[seed]
                position = {qid: j for j, qid in enumerate(s.ids)}
                values = s.scores.get(metric)
                if values is not None:
                    out[i] = [values[position[q]] for q in ids]
            return out

        metrics = list(dict.fromkeys(m for by_seed in scored.values() for s in by_seed.values() for m in s.scores))
        blind_by_seed = {0: blind}
        for name in [IMAGE_BLIND, *names]:
            by_seed = blind_by_seed if name == IMAGE_BLIND else scored.get(name)
            if not by_seed:
                continue
            seeds = sorted(by_seed)
            for metric in metrics:
                x = matrix(by_seed, metric, seeds)
                if not np.isfinite(x).any():
                    continue
                row = {"formulation": name, "evaluation": evaluation, "metric": metric, "seeds": len(seeds),
                       "questions": int(np.isfinite(x[0]).sum()),
                       **matrix_stats(x, draws_by_n[len(seeds)]), "delta": math.nan, "delta_low": math.nan,
                       "delta_high": math.nan}
                if baseline and name not in (baseline, IMAGE_BLIND) and baseline in scored:
                    shared = [s for s in seeds if s in scored[baseline]]
                    if shared:
                        d = matrix(by_seed, metric, shared) - matrix(scored[baseline], metric, shared)
                        stats = matrix_stats(d, draws_by_n[len(shared)])
                        row.update(delta=stats["mean"], delta_low=stats["low"], delta_high=stats["high"])
                rows.append(row)
    rows += run_metric_rows(results, names, baseline)
    runs = {name: {"seeds": [r["seed"] for r in results if r["name"] == name],
                   "steps": _mean([r.get("steps") for r in results if r["name"] == name]),
                   "fit_seconds": _mean([r.get("fit_seconds") for r in results if r["name"] == name])} for name in names}
    return Summary(rows, names, eval_info, baseline, runs)


def _mean(values: list[Any]) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else math.nan


def run_metric_rows(results: list[dict[str, Any]], names: list[str], baseline: str | None) -> list[dict[str, Any]]:
    """Mean and std over seeds of the metrics only the logs have (RUN_METRICS, prefixed per evaluation when
    there are several); the difference to the baseline is of the means, with no interval."""
    rows = []
    for name in names:
        runs = [r for r in results if r["name"] == name]
        keys = [k for k in dict.fromkeys(k for r in runs for k in r.get("metrics", {})) if _split_eval(k)[1] in RUN_METRICS]
        for key in keys:
            values = np.array([r["metrics"].get(key, math.nan) for r in runs], dtype=float)
            evaluation, metric = _split_eval(key)
            row = {"formulation": name, "evaluation": evaluation, "metric": metric, "seeds": int(np.isfinite(values).sum()),
                   "questions": math.nan, "mean": float(_nanmean(values)),
                   "std": float(np.nanstd(values, ddof=1)) if len(values) > 1 else math.nan,
                   "low": math.nan, "high": math.nan, "delta": math.nan, "delta_low": math.nan, "delta_high": math.nan}
            base = [r for r in results if r["name"] == baseline]
            if base and name != baseline and metric not in NOT_COMPARABLE:
                row["delta"] = row["mean"] - float(_nanmean(np.array([r["metrics"].get(key, math.nan) for r in base])))
            rows.append(row)
    return rows


def _split_eval(key: str) -> tuple[str, str]:
    """`vqa_rad/closed_accuracy_run_eval` -> (vqa_rad, ...); `bleu` -> (test, bleu); `val_loss` -> (fit, val_loss);
    `nli/x` stays one metric."""
    if key.startswith("val_"):
        return "fit", key
    head, _, tail = key.partition("/")
    if tail and head != "nli":
        return head, tail
    return SINGLE_EVAL, key


# ---------------------------------------------------------------- tables
def to_csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else f"{v:.6g}" if isinstance(v, float) else v)
                         for k, v in row.items()})
    return buf.getvalue()


def _num(v: Any, signed: bool = False) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else (f"{v:+.3f}" if signed else f"{v:.3f}")


def value_cell(row: dict[str, Any] | None) -> str:
    """`0.712 ± 0.020 [0.680, 0.741]` (std over seeds, 95% interval), parts left out when unknown."""
    if row is None:
        return "–"
    text = _num(row["mean"])
    if not math.isnan(row["std"]):
        text += f" ± {row['std']:.3f}"
    if not math.isnan(row["low"]):
        text += f" [{row['low']:.3f}, {row['high']:.3f}]"
    return text


def delta_cell(row: dict[str, Any] | None) -> str:
    """`+0.031 [-0.010, +0.070]`, with `*` when the interval excludes 0."""
    if row is None or math.isnan(row["delta"]):
        return "–"
    text = _num(row["delta"], signed=True)
    if not math.isnan(row["delta_low"]):
        star = "*" if row["delta_low"] > 0 or row["delta_high"] < 0 else ""
        text += f" [{row['delta_low']:+.3f}, {row['delta_high']:+.3f}]{star}"
    return text


def _table(summary: Summary, evaluation: str, metrics: list[str], cell, names: list[str]) -> list[str]:
    head = ["formulation", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        label = f"**{name}**" if name == summary.baseline else f"_{name}_" if name == IMAGE_BLIND else name
        lines.append("| " + " | ".join([label, *(cell(summary.value(name, evaluation, m)) for m in metrics)]) + " |")
    return lines


def to_markdown(summary: Summary) -> str:
    """Per evaluation: scores (mean ± std [95% CI]), paired differences to the baseline, error shares; then the
    run-level metrics."""
    if not summary.formulations:
        return "(no finished runs)\n"
    seeds = sorted({s for run in summary.runs.values() for s in run["seeds"]})
    lines = [f"Seeds {seeds}; cells: mean over seeds and questions ± std of the per-seed means "
             "[95% bootstrap interval over seeds and questions]. "
             f"`{IMAGE_BLIND}`: the most common test answer per question text (no image)."]
    names = [IMAGE_BLIND, *summary.formulations]
    for evaluation, info in summary.evaluations.items():
        metrics = summary.metrics(evaluation)
        scores = [m for m in metrics if not m.startswith("err/") and m not in RUN_METRICS]
        errors = [m for m in metrics if m.startswith("err/")]
        lines += ["", f"## {evaluation}: {info['questions']} questions", "", "### Scores", "",
                  *_table(summary, evaluation, scores, value_cell, names)]
        if summary.baseline:
            lines += ["", f"### Difference to {summary.baseline} (paired over seeds and questions; * = the 95% "
                      "interval excludes 0)", "",
                      *_table(summary, evaluation, scores + errors, delta_cell,
                              [n for n in summary.formulations if n != summary.baseline])]
        if errors:
            how = ("judged lexically (prediction vs gold through the targeted builder's lexicon)" if info["lexical"]
                   else "judged from the images' ground truth")
            lines += ["", f"### Errors: share of questions per error type, {how}; err/visual = any visual "
                      "misinterpretation (laterality, missed or invented lesion, wrong modality or organ)", "",
                      *_table(summary, evaluation, errors, value_cell, names)]
    run_rows = [r for r in summary.rows if r["metric"] in RUN_METRICS]
    if run_rows:
        keys = list(dict.fromkeys((r["evaluation"], r["metric"]) for r in run_rows))
        head = ["formulation", *(m if e in ("fit", SINGLE_EVAL) else f"{e}/{m}" for e, m in keys), "steps", "fit s"]
        lines += ["", "## From the logs (mean ± std over seeds; val_* from the fit's last validation; val_loss and "
                  "val_reward_margin differ in definition between formulations)", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name in summary.formulations:
            cells = [value_cell(summary.value(name, e, m)) for e, m in keys]
            run = summary.runs[name]
            cells += [_num(run["steps"]).removesuffix(".000"), "–" if math.isnan(run["fit_seconds"]) else f"{run['fit_seconds']:.0f}"]
            lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines) + "\n"


def write_summary(out_dir: str | Path, baseline: str | None = None, bootstrap: int = 1000) -> dict[str, Path]:
    """summary.csv (one row per formulation, evaluation and metric) and summary.md from the finished runs."""
    out_dir = Path(out_dir)
    summary = summarize(load_results(out_dir), out_dir, baseline, bootstrap=bootstrap)
    paths = {"csv": out_dir / "summary.csv", "md": out_dir / "summary.md"}
    write_text_atomic(paths["csv"], to_csv(summary.rows), "the benchmark summary")
    write_text_atomic(paths["md"], f"# Benchmark {out_dir.name}\n\n" + to_markdown(summary), "the benchmark summary")
    return paths


# ---------------------------------------------------------------- plots
def training_curves(out_dir: str | Path, names: list[str] | None = None) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """formulation -> TensorBoard tag -> [(step, mean over seeds)] of its fits, read back from the event files."""
    from lightning_meddpo.eval.tensorboard import read_scalars

    out_dir = Path(out_dir)
    results = load_results(out_dir)
    names = names if names is not None else list(dict.fromkeys(r["name"] for r in results))
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for name in names:
        per_tag: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in results:
            if r["name"] == name and (run_dir(out_dir, r) / "fit").is_dir():
                for tag, series in read_scalars(run_dir(out_dir, r) / "fit").items():
                    for step, value in series:
                        per_tag[tag][step].append(value)
        if per_tag:
            curves[name] = {tag: [(s, float(np.mean(v))) for s, v in sorted(steps.items())] for tag, steps in per_tag.items()}
    return curves


def _pyplot(path):
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(summary: Summary, path: str | Path | None = None, metrics: list[str] | None = None):
    """One bar chart per (evaluation, metric): bars are formulations (the image-blind row white), error bars
    the 95% bootstrap interval, the dashed line the baseline. Default metrics: KEY_METRICS and acc/*. Returns
    the figure."""
    plt = _pyplot(path)
    panels = [(e, m) for e in summary.evaluations for m in summary.metrics(e)
              if (m in metrics if metrics is not None else (m in KEY_METRICS or m.startswith("acc/")))]
    n = max(1, len(panels))
    ncols = min(3, n)
    fig, axes = plt.subplots(math.ceil(n / ncols), ncols, figsize=(4.4 * ncols, 3.3 * math.ceil(n / ncols)), squeeze=False)
    names = [IMAGE_BLIND, *summary.formulations]
    for ax, (evaluation, metric) in zip(axes.flat, panels):
        rows = [summary.value(name, evaluation, metric) for name in names]
        shown = [(name, r) for name, r in zip(names, rows) if r is not None]
        means = [r["mean"] for _, r in shown]
        err = np.array([[max(0.0, r["mean"] - r["low"]) if not math.isnan(r["low"]) else 0.0 for _, r in shown],
                        [max(0.0, r["high"] - r["mean"]) if not math.isnan(r["high"]) else 0.0 for _, r in shown]])
        colors = ["white" if n == IMAGE_BLIND else "tab:gray" if n == summary.baseline else "tab:blue" for n, _ in shown]
        ax.bar(range(len(shown)), means, yerr=err, color=colors, edgecolor="black", linewidth=0.5, capsize=2)
        base = summary.value(summary.baseline, evaluation, metric) if summary.baseline else None
        if base is not None:
            ax.axhline(base["mean"], color="black", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(shown)), [n for n, _ in shown], rotation=45, ha="right", fontsize=8)
        arrow = " (lower is better)" if metric in LOWER_IS_BETTER else ""
        title = metric if len(summary.evaluations) == 1 else f"{evaluation}: {metric}"
        ax.set_title(title + arrow, fontsize=9)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    if path is not None:
        _save(fig, path, plt)
    return fig


def _save(fig, path: str | Path, plt) -> None:
    with writing(path, "the plot"):
        fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_errors(summary: Summary, path: str | Path | None = None):
    """The error analysis as bars with 95% intervals: one panel per visual error type and err/visual."""
    return plot_metrics(summary, path, metrics=[m for m in ERROR_METRICS if m.removeprefix("err/") in (*VISUAL_ERRORS, "visual")])


def plot_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], path: str | Path | None = None,
                tags: tuple[tuple[str, str], ...] = CURVES):
    """Training curves (mean over seeds) of every formulation, one panel per tag. Returns the figure."""
    plt = _pyplot(path)
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
        _save(fig, path, plt)
    return fig


__all__ = ["CURVES", "ERROR_METRICS", "IMAGE_BLIND", "QUESTION_METRICS", "RESULT_NAME", "Summary", "delta_cell",
           "eval_dir_name", "image_blind_rows", "load_results", "matrix_stats", "plot_curves", "plot_errors",
           "plot_metrics", "read_predictions", "read_questions", "run_dir", "score_rows", "summarize", "to_markdown",
           "training_curves", "value_cell", "write_summary"]
