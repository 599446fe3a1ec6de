"""Error analysis of VQA predictions: what kind of visual misinterpretation each wrong answer is.

Every prediction is one of ERROR_TYPES: correct, laterality (the wrong side), missed_lesion (a finding the
image has, denied), invented_lesion (a finding it lacks, asserted), wrong_modality, wrong_organ, other.

- With ground truth (the demo's vqa_test.jsonl carries each question's `question_type`, `modality`,
  `organ`, `lesion_side`): `classify_with_truth` decides from what the image shows.
- Without (VQA-RAD, SLAKE, PathVQA): `classify_lexical` compares the prediction with the gold answer
  through the targeted builder's lexicon (data/lexicon.py: sides, presence, modalities, anatomy). This is
  lexical: it sees the words, not the image; a wrong answer naming none of those terms is "other".
"""

from __future__ import annotations

from typing import Any

from lightning_meddpo.data.lexicon import LEXICON
from lightning_meddpo.eval.metrics import (
    normalize_answer,
    strict_closed_hit,
    token_recall,
)

ERROR_TYPES = ("correct", "laterality", "missed_lesion", "invented_lesion", "wrong_modality", "wrong_organ", "other")
VISUAL_ERRORS = ERROR_TYPES[1:-1]
TRUTH_FIELDS = ("question_type", "modality", "organ", "lesion_side")


SIDES = {"left": "left", "right": "right"}
MODALITIES = {normalize_answer(t): normalize_answer(t) for t in LEXICON["modality"]["groups"][0]} | {
    "mr": "mri", "magnetic resonance": "mri", "computed tomography": "ct", "radiograph": "x ray",
    "radiography": "x ray", "sonogram": "ultrasound", "ultrasonography": "ultrasound"}
ORGANS = {normalize_answer(t): normalize_answer(t) for t in LEXICON["anatomy"]["groups"][0]} | {
    "lungs": "lung", "kidneys": "kidney", "ovaries": "ovary", "breasts": "breast", "adrenal glands": "adrenal gland"}


def found(text: str, vocabulary: dict[str, str]) -> set[str]:
    """The canonical terms of `vocabulary` that occur in `text` as whole words (after normalisation)."""
    padded = f" {normalize_answer(text)} "
    return {canonical for term, canonical in vocabulary.items() if f" {term} " in padded}


def asserts_finding(text: str) -> bool | None:
    """True ("yes", "there is a ..."), False ("no", "there is no ...") or None (neither)."""
    words = normalize_answer(text).split()
    first = next((w for w in words if w in ("yes", "no")), None)
    if first is not None:
        return first == "yes"
    padded = f" {' '.join(words)} "
    if any(f" {n} " in padded for n in ("there is no", "there are no", "no evidence", "absent", "not seen")):
        return False
    if any(f" {p} " in padded for p in ("there is", "there are", "present", "seen")):
        return True
    return None


def _wrong(named: set[str], right: str | None) -> bool:
    return bool(named) and (right is None or right not in named or len(named) > 1)


def classify_with_truth(prediction: str, question: dict[str, Any]) -> str:
    """The error type of a prediction to a demo question, from the image's ground truth."""
    kind, side = question["question_type"], question.get("lesion_side")
    sides = found(prediction, SIDES)
    if kind in ("presence", "side"):
        says = asserts_finding(prediction)
        if kind == "presence" and says is None:
            return "other"
        if side is None:
            return "invented_lesion" if says or (kind == "side" and sides) else "correct"
        if says is False:
            return "missed_lesion"
        if _wrong(sides, side):
            return "laterality"
        return "correct" if kind == "presence" or side in sides else "other"
    if kind == "modality":
        named = found(prediction, MODALITIES)
        return "correct" if named == {normalize_answer(question["modality"])} else "wrong_modality" if named else "other"
    if kind == "organ":
        named = found(prediction, ORGANS)
        return "correct" if named == {question["organ"]} else "wrong_organ" if named else "other"
    raise ValueError(f"unknown question_type {kind!r}")


def classify_lexical(prediction: str, gold: str, answer_type: str) -> str:
    """The error type of a prediction judged against the gold answer's words only (see module docstring)."""
    if (strict_closed_hit(prediction, gold) if answer_type == "CLOSED" else token_recall(prediction, gold) == 1.0):
        return "correct"
    if answer_type == "CLOSED":
        gold_says, says = asserts_finding(gold), asserts_finding(prediction)
        if gold_says is True and says is False:
            return "missed_lesion"
        if gold_says is False and says is True:
            return "invented_lesion"
    for vocabulary, error in ((SIDES, "laterality"), (MODALITIES, "wrong_modality"), (ORGANS, "wrong_organ")):
        gold_terms, named = found(gold, vocabulary), found(prediction, vocabulary)
        if gold_terms and named and named != gold_terms:
            return error
    return "other"


def classify(prediction: str, question: dict[str, Any]) -> tuple[str, bool]:
    """(error type, whether it was judged lexically) for a prediction row joined with its question."""
    if all(question.get(f) is not None or f == "lesion_side" for f in TRUTH_FIELDS) and "question_type" in question:
        return classify_with_truth(prediction, question), False
    return classify_lexical(prediction, str(question["gold"]), question.get("answer_type", "OPEN")), True


__all__ = ["ERROR_TYPES", "VISUAL_ERRORS", "classify", "classify_lexical", "classify_with_truth", "found"]
