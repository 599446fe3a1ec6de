"""VQA and report metrics: hand-made cases, quirks, hand-computed BLEU/ROUGE-L, cross-rank merging."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_meddpo.eval.metrics import (
    BLEU,
    ClippedOpenRecall,
    ClosedAccuracy,
    ClosedAccuracyRunEval,
    ExactMatch,
    OpenRecall,
    RougeL,
    StrictClosedAccuracy,
    TokenF1,
    corpus_bleu,
    lcs_length,
    llava_med_closed_outcome,
    llava_med_f1,
    llava_med_normalize,
    normalize_answer,
    rouge_l,
    tokens,
)


def value(metric_cls, preds, golds, **kw) -> float:
    m = metric_cls(**kw)
    m.update(preds, golds)
    return float(m.compute())


# ------------------------------------------------------------------ normalisation
@pytest.mark.parametrize(
    "text, expected",
    [
        ("The LEFT lung.", "left lung"),
        ("  Yes ,\tthere is  ", "yes there is"),
        ("T2-weighted MRI!", "t2 weighted mri"),
        ("Patient's heart: 2.5 cm; 1,000 ml", "patients heart 2.5 cm 1000 ml"),
        ("two nodules (right/left)", "2 nodules right left"),
        ("", ""),
        ("?!.", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected
    assert tokens(text) == expected.split()


def test_report_mode_keeps_articles_and_number_words():
    assert normalize_answer("The two lungs.", answer_mode=False) == "the two lungs"


# ------------------------------------------------------------------ closed questions
def test_containment_quirk_no_in_nodule():
    # LLaVA-Med's containment counts gold "no" inside "nodule"; the strict variant does not.
    assert value(ClosedAccuracy, ["A nodule is seen."], ["no"]) == 1.0
    assert value(StrictClosedAccuracy, ["A nodule is seen."], ["no"]) == 0.0


@pytest.mark.parametrize(
    "pred, gold, loose, strict",
    [
        ("Yes.", "yes", 1, 1),
        ("  YES, there is an effusion ", "yes", 1, 1),
        ("No, but yes on the left", "no", 1, 1),        # first yes/no word decides
        ("Yes, no effusion", "no", 1, 0),               # containment hits, first word says yes
        ("not sure", "no", 1, 0),                       # containment again: "no" in "not"
        ("unclear", "no", 0, 0),
        ("", "yes", 0, 0),                              # empty prediction
        ("The lung", "lung", 1, 1),                     # article and case ignored
        ("left lung", "lung", 1, 0),                    # containment vs exact
        ("T2", "t2", 1, 1),
        ("t2-weighted", "T2", 1, 0),
        ("CT.", "ct", 1, 1),
    ],
)
def test_closed_cases(pred, gold, loose, strict):
    assert value(ClosedAccuracy, [pred], [gold]) == loose
    assert value(StrictClosedAccuracy, [pred], [gold]) == strict


def test_closed_require_yes_no_reproduces_llava_med_guard():
    # LLaVA-Med's script only scores a closed hit when "yes" or "no" occurs in the prediction.
    assert value(ClosedAccuracy, ["lung"], ["lung"], require_yes_no=True) == 0.0
    assert value(ClosedAccuracy, ["lung"], ["lung"]) == 1.0


def test_closed_accuracy_mean_over_batch():
    m = ClosedAccuracy()
    m.update(["yes", "no", "nodule"], ["yes", "yes", "no"])
    m.update(["lung"], ["liver"])
    assert float(m.compute()) == pytest.approx(2 / 4)


# ------------------------------------------------------------------ open questions
def test_open_recall_exact_f1():
    preds = ["The left lower lobe", "", "right lung, right lung", "Liver."]
    golds = ["left lobe", "heart", "right lung", "the liver"]
    # recall: 2/2, 0, 2/2, 1/1
    assert value(ClippedOpenRecall, preds, golds) == pytest.approx((1 + 0 + 1 + 1) / 4)
    # exact: only "Liver." == "the liver" after normalisation
    assert value(ExactMatch, preds, golds) == pytest.approx(1 / 4)
    # F1: (p=2/3, r=1) -> 0.8 ; 0 ; (p=2/4, r=1) -> 2/3 ; 1
    assert value(TokenF1, preds, golds) == pytest.approx((0.8 + 0 + 2 / 3 + 1) / 4)


def test_open_recall_clips_repeated_gold_tokens():
    # gold has "lung" twice; a single "lung" in the prediction covers half of those two tokens.
    assert value(ClippedOpenRecall, ["lung"], ["lung lung"]) == pytest.approx(0.5)


def test_empty_gold_and_length_mismatch_are_errors():
    with pytest.raises(ValueError, match="index 1"):
        ClosedAccuracy().update(["a", "b"], ["yes", " . "])
    with pytest.raises(ValueError, match="2 predictions but 1"):
        ExactMatch().update(["a", "b"], ["a"])
    with pytest.raises(TypeError):
        ExactMatch().update("abc", "abc")


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_compute_without_samples_is_nan():
    assert math.isnan(float(ExactMatch().compute()))
    assert math.isnan(float(BLEU().compute()))


# ------------------------------------------------------------------ reports
PAIR1 = ("the cat sat on the mat", "the cat is on the mat")
PAIR2 = ("there is a small nodule in the left lung", "there is a nodule in the left lung")


def test_bleu_hand_computed():
    # PAIR2 alone: clipped matches [8, 6, 4, 2] of [9, 8, 7, 6]; 9 > 8 tokens so BP = 1.
    assert value(BLEU, [PAIR2[0]], [PAIR2[1]]) == pytest.approx((8 * 6 * 4 * 2 / (9 * 8 * 7 * 6)) ** 0.25)
    # Corpus of both: matches [5+8, 3+6, 1+4, 0+2] of [6+9, 5+8, 4+7, 3+6]; lengths 15 vs 14.
    corpus = value(BLEU, [PAIR1[0], PAIR2[0]], [PAIR1[1], PAIR2[1]])
    assert corpus == pytest.approx((2 / 33) ** 0.25)
    # PAIR1 alone has no matching 4-gram: BLEU-4 is 0 without smoothing.
    assert value(BLEU, [PAIR1[0]], [PAIR1[1]]) == 0.0
    # Brevity penalty: perfect precision, 7 tokens against 8.
    short = value(BLEU, ["There is a nodule in the left."], ["there is a nodule in the left lung"])
    assert short == pytest.approx(math.exp(1 - 8 / 7))
    assert corpus_bleu([PAIR1[0], PAIR2[0]], [PAIR1[1], PAIR2[1]]) == pytest.approx(corpus)


def test_bleu_scores_our_words():
    """BLEU is torchmetrics' on our normalised text: a decimal stays one word (13a would split "2.5" from raw
    text), apostrophes go, case is ignored. Unigram BLEU = BP * p1: "size 2.5" against "size 2.5 cm" is two
    words of three, p1 = 1, BP = exp(1 - 3/2); split, it would be exp(1 - 5/4)."""
    one_gram = value(lambda: BLEU(n_gram=1), ["Size 2.5"], ["size 2.5 cm"])
    assert one_gram == pytest.approx(math.exp(1 - 3 / 2))
    assert value(lambda: BLEU(n_gram=1), ["the patient's heart"], ["The patients heart"]) == pytest.approx(1.0)


def test_bleu_multiple_references():
    # The second reference is identical to the prediction: all n-grams match, closest length equal.
    assert value(BLEU, [PAIR2[0]], [[PAIR2[1], PAIR2[0]]]) == pytest.approx(1.0)


def test_rouge_l_hand_computed():
    assert lcs_length("a b c d".split(), "a c d b".split()) == 3
    assert rouge_l(*PAIR1) == pytest.approx(5 / 6)                            # LCS "the cat on the mat"
    assert rouge_l("Left lung nodule.", "nodule in the left lung") == pytest.approx(0.5)  # LCS 2; P 2/3, R 2/5
    assert rouge_l("", "nodule") == 0.0
    assert value(RougeL, [PAIR1[0], "left lung nodule"], [PAIR1[1], "nodule in the left lung"]) == pytest.approx(
        (5 / 6 + 0.5) / 2
    )


# ------------------------------------------------------------------ cross-rank reduction
ALL_PREDS = ["yes", "A nodule.", "left lung", "", "there is a small nodule in the left lung", "t2"]
ALL_GOLDS = ["yes", "no", "lung", "yes", "there is a nodule in the left lung", "T2"]


@pytest.mark.parametrize("cls", [ClosedAccuracy, StrictClosedAccuracy, ClosedAccuracyRunEval, OpenRecall, ClippedOpenRecall,
                                 ExactMatch, TokenF1, BLEU, RougeL])
def test_two_ranks_merge_equals_one_process(cls):
    whole = cls()
    whole.update(ALL_PREDS, ALL_GOLDS)

    rank0, rank1 = cls(), cls()
    rank0.update(ALL_PREDS[:2], ALL_GOLDS[:2])
    rank1.update(ALL_PREDS[2:], ALL_GOLDS[2:])
    # What a DDP sync does with dist_reduce_fx="sum": every state is summed across ranks.
    for name, fx in rank0._reductions.items():
        assert fx is not None and "sum" in getattr(fx, "__name__", str(fx)), name
    rank0.merge_state(rank1)
    assert torch.allclose(rank0.compute(), whole.compute())

    # The same by hand: sum the state tensors into a fresh metric.
    a, b, merged = cls(), cls(), cls()
    a.update(ALL_PREDS[:3], ALL_GOLDS[:3])
    b.update(ALL_PREDS[3:], ALL_GOLDS[3:])
    for name in merged._defaults:
        setattr(merged, name, getattr(a, name) + getattr(b, name))
    merged._update_count = 1
    assert torch.allclose(merged.compute(), whole.compute())


def test_states_are_summed_across_ranks():
    for cls in (ClosedAccuracy, BLEU, RougeL):
        m = cls()
        assert m._reductions and all(fx.__name__ in {"dim_zero_sum", "sum"} for fx in m._reductions.values())


# ------------------------------------------------------------------ LLaVA-Med's run_eval.py, exactly
def test_llava_med_recall_counts_repeated_prediction_words():
    """calculate_f1score: tp is the prediction's count of gold words, so 15 x "lung" against
    "Lung, Spinal Cord" scores 15 / (15 + 2) there; our clipped recall gives 1/3."""
    pred, gold = " ".join(["lung"] * 15), "Lung, Spinal Cord"
    assert value(OpenRecall, [pred], [gold]) == pytest.approx(15 / 17)
    assert value(ClippedOpenRecall, [pred], [gold]) == pytest.approx(1 / 3)
    f1, precision, recall = llava_med_f1("a left lung lesion", "left lung")
    assert (precision, recall) == (pytest.approx(2 / 3), 1.0) and f1 == pytest.approx(0.8)  # "a" dropped as an article
    assert llava_med_f1("", "lung") == (0.0, 0.0, 0.0) and llava_med_f1("heart", "lung") == (0.0, 0.0, 0.0)


def test_llava_med_normalize_word_quirks():
    assert llava_med_normalize("The left-lung, two nodules.") == "left lung 2 nodules"
    assert llava_med_normalize("none of them") == "0 of them"  # its manual map has none -> 0
    assert llava_med_normalize("size 2.5 cm") == "size 2.5 cm"  # a period before a digit stays
    assert llava_med_normalize("dont know") == "don't know"


def test_run_eval_closed_accuracy_drops_wrong_yes_no_answers_from_the_denominator():
    preds = ["Yes, there is.", "No.", "yes", "The lung", "nodule seen"]
    golds = ["yes", "yes", "no", "yes", "no"]
    # hit; yes/no present but wrong: not counted; not counted; no yes/no: a miss; "no" inside "nodule": a hit
    assert [llava_med_closed_outcome(p, g) for p, g in zip(preds, golds)] == [1, None, None, 0, 1]
    assert value(ClosedAccuracyRunEval, preds, golds) == pytest.approx(2 / 3)
    assert value(ClosedAccuracy, preds, golds) == pytest.approx(2 / 5)  # every question counted
