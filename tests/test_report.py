"""The benchmark's statistics on hand-made prediction files: per-question scores, seed std, bootstrap
intervals, the paired difference to the baseline, the image-blind row and the error shares."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from lightning_meddpo.commands.report import (
    IMAGE_BLIND,
    image_blind_rows,
    load_results,
    matrix_stats,
    score_rows,
    summarize,
    to_markdown,
    write_summary,
)

QUESTIONS = [  # (id, question text, gold, answer type, ground truth)
    ("q0", "Is there a lesion in this image?", "yes", "CLOSED", {"question_type": "presence", "lesion_side": "left"}),
    ("q1", "Is there a lesion in this image?", "no", "CLOSED", {"question_type": "presence", "lesion_side": None}),
    ("q2", "Is there a lesion in this image?", "yes", "CLOSED", {"question_type": "presence", "lesion_side": "right"}),
    ("q3", "What is the imaging modality?", "CT", "OPEN", {"question_type": "modality", "lesion_side": None}),
]
TRUTH = {"modality": "CT", "organ": "lung"}


def write_run(out_dir: Path, name: str, seed: int, predictions: list[str], test_file: Path, metrics=None) -> None:
    run = out_dir / name / f"seed_{seed}"
    (run / "test").mkdir(parents=True)
    rows = [{"question_id": qid, "image": f"{qid}.png", "prompt": f"<image>\n{text}", "prediction": p, "gold": gold,
             "answer_type": atype} for (qid, text, gold, atype, _), p in zip(QUESTIONS, predictions, strict=True)]
    (run / "test" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = {"name": name, "seed": seed, "test_files": {"test": str(test_file)}, "metrics": metrics or {}, "steps": 10,
              "fit_seconds": 1.0}
    (run / "result.json").write_text(json.dumps(result))


@pytest.fixture
def test_file(tmp_path) -> Path:
    path = tmp_path / "vqa_test.jsonl"
    path.write_text("".join(json.dumps({"question_id": qid, "text": text, "answer": gold, "answer_type": atype,
                                        **TRUTH, **truth}) + "\n" for qid, text, gold, atype, truth in QUESTIONS))
    return path


def test_per_question_scores_and_errors(test_file):
    from lightning_meddpo.commands.report import read_questions

    rows = [{"question_id": q[0], "prompt": q[1], "prediction": p, "gold": q[2], "answer_type": q[3]}
            for q, p in zip(QUESTIONS, ["Yes, on the right side.", "yes", "no", "MRI"])]
    scored = score_rows(rows, read_questions(test_file))
    assert scored.errors == ["laterality", "invented_lesion", "missed_lesion", "wrong_modality"] and not scored.lexical
    assert scored.scores["closed_accuracy"][:3] == [1.0, 0.0, 0.0] and math.isnan(scored.scores["closed_accuracy"][3])
    assert scored.scores["acc/presence"][:3] == [0.0, 0.0, 0.0] and scored.scores["acc/modality"][3] == 0.0
    assert scored.scores["err/visual"] == [1.0, 1.0, 1.0, 1.0]
    lexical = score_rows(rows, {})  # no ground truth: judged against the gold's words
    assert lexical.lexical and lexical.errors == ["correct", "invented_lesion", "missed_lesion", "wrong_modality"]
    assert not any(k.startswith("acc/") for k in lexical.scores)


def test_image_blind_answers_the_majority_per_question_text():
    rows = [{"question_id": q[0], "prompt": f"<image>\n{q[1]}", "prediction": "", "gold": q[2], "answer_type": q[3]}
            for q in QUESTIONS]
    assert [r["prediction"] for r in image_blind_rows(rows)] == ["yes", "yes", "yes", "CT"]


def test_matrix_stats():
    x = np.array([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # per-seed means 0.5 and 1.0
    stats = matrix_stats(x, (np.random.default_rng(0).integers(0, 2, (500, 2)), np.random.default_rng(1).integers(0, 4, (500, 4))))
    assert stats["mean"] == 0.75 and math.isclose(stats["std"], 0.5 / math.sqrt(2))
    assert 0.0 <= stats["low"] < 0.75 < stats["high"] <= 1.0
    constant = matrix_stats(np.full((3, 5), 0.4), (np.zeros((10, 3), int), np.zeros((10, 5), int)))
    assert constant["std"] == pytest.approx(0.0, abs=1e-12) and constant["low"] == constant["high"] == pytest.approx(0.4)
    assert math.isnan(matrix_stats(np.ones((1, 3)), None)["std"])  # one seed: no std


def test_summary_seeds_paired_difference_and_errors(tmp_path, test_file):
    out = tmp_path / "grid"
    # sft says "no" everywhere; fixed says the right thing on every presence question, in both seeds;
    # noisy is right on q0 only in seed 0.
    for seed in (0, 1):
        write_run(out, "sft", seed, ["no", "no", "no", "MRI"], test_file, {"val_reward_accuracy": 0.5 + seed / 10})
        write_run(out, "fixed", seed, ["yes, left", "no", "yes, right", "CT"], test_file, {"val_reward_accuracy": 0.9})
        write_run(out, "noisy", seed, ["yes" if seed == 0 else "no", "no", "no", "MRI"], test_file)
    (out / "formulations.json").write_text(json.dumps(["sft", "fixed", "noisy"]))
    results = load_results(out)
    assert [(r["name"], r["seed"]) for r in results] == [("sft", 0), ("sft", 1), ("fixed", 0), ("fixed", 1),
                                                          ("noisy", 0), ("noisy", 1)]
    summary = summarize(results, out, baseline="sft", bootstrap=300)

    def row(name, metric):
        return summary.value(name, "test", metric)

    assert row("sft", "closed_accuracy")["mean"] == pytest.approx(1 / 3)
    assert row("fixed", "closed_accuracy")["mean"] == 1.0 and row("fixed", "closed_accuracy")["std"] == 0.0
    assert row("fixed", "closed_accuracy")["delta"] == pytest.approx(2 / 3)
    # fewer visual errors on every question where sft makes one (3 of 4): the interval excludes 0
    assert row("fixed", "err/visual")["delta"] == pytest.approx(-0.75) and row("fixed", "err/visual")["delta_high"] < 0
    noisy = row("noisy", "closed_accuracy")
    assert noisy["delta"] == pytest.approx(1 / 6) and noisy["delta_low"] == 0.0  # one seed, one question: not significant
    assert noisy["std"] == pytest.approx((1 / 3) / math.sqrt(2))
    assert row("sft", "err/missed_lesion")["mean"] == 0.5 and row("sft", "err/wrong_modality")["mean"] == 0.25
    assert row("fixed", "err/visual")["mean"] == 0.0
    assert row("fixed", "acc/presence")["mean"] == 1.0 and row("sft", "acc/modality")["mean"] == 0.0
    blind = row(IMAGE_BLIND, "closed_accuracy")
    assert blind["mean"] == pytest.approx(2 / 3) and blind["seeds"] == 1  # majority "yes"
    assert summary.value("sft", "fit", "val_reward_accuracy")["mean"] == pytest.approx(0.55)
    assert summary.value("fixed", "fit", "val_reward_accuracy")["delta"] == pytest.approx(0.35)
    md = to_markdown(summary)
    assert "| fixed | +0.667 [" in md and "-0.750 [-1.000, " in md and "]* |" in md  # significant differences starred
    paths = write_summary(out, "sft", bootstrap=100)
    assert paths["csv"].read_text().startswith("formulation,evaluation,metric,seeds,questions,mean,std,low,high,delta")


def test_runs_must_answer_the_same_questions(tmp_path, test_file):
    out = tmp_path / "grid"
    write_run(out, "sft", 0, ["no", "no", "no", "MRI"], test_file)
    write_run(out, "dpo", 0, ["no", "no", "no", "MRI"], test_file)
    path = out / "dpo" / "seed_0" / "test" / "predictions.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:3]))
    with pytest.raises(ValueError, match="sft seed 0 and dpo seed 0 answered different questions on test"):
        summarize(load_results(out), out, "sft")
