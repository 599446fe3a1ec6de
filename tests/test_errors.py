"""Error analysis: each wrong VQA answer named by the visual misinterpretation it is."""

from __future__ import annotations

import pytest

from lightning_meddpo.eval.errors import classify, classify_lexical, classify_with_truth

LEFT_LUNG = {"question_type": "presence", "modality": "CT", "organ": "lung", "lesion_side": "left"}
NO_LESION = {**LEFT_LUNG, "lesion_side": None}


@pytest.mark.parametrize("question, prediction, expected", [
    (LEFT_LUNG, "Yes, there is a lesion in the left side of the lung.", "correct"),
    (LEFT_LUNG, "Yes, there is a lesion in the right side of the lung.", "laterality"),
    (LEFT_LUNG, "No, there is no lesion in this image.", "missed_lesion"),
    (NO_LESION, "Yes, there is a lesion in the left side of the lung.", "invented_lesion"),
    (NO_LESION, "No, there is no lesion in this image.", "correct"),
    ({**LEFT_LUNG, "question_type": "side"}, "The lesion is on the right side.", "laterality"),
    ({**LEFT_LUNG, "question_type": "side"}, "The lesion is on the left side.", "correct"),
    ({**LEFT_LUNG, "question_type": "modality"}, "This is an MRI scan.", "wrong_modality"),
    ({**LEFT_LUNG, "question_type": "modality"}, "This is a CT scan.", "correct"),
    ({**LEFT_LUNG, "question_type": "modality", "modality": "X-ray"}, "This is an X-ray image.", "correct"),
    ({**LEFT_LUNG, "question_type": "organ"}, "The image shows the liver.", "wrong_organ"),
    ({**LEFT_LUNG, "question_type": "organ"}, "The image shows the lung.", "correct"),
    ({**LEFT_LUNG, "question_type": "organ"}, "I cannot tell.", "other"),
])
def test_with_ground_truth(question, prediction, expected):
    assert classify_with_truth(prediction, question) == expected


@pytest.mark.parametrize("prediction, gold, answer_type, expected", [
    ("Yes", "yes", "CLOSED", "correct"),
    ("No, the lungs are clear.", "yes", "CLOSED", "missed_lesion"),
    ("Yes, there is an effusion.", "no", "CLOSED", "invented_lesion"),
    ("The right kidney", "left kidney", "OPEN", "laterality"),
    ("This is a CT scan", "MRI", "OPEN", "wrong_modality"),
    ("liver", "Lung, Spinal Cord", "OPEN", "wrong_organ"),
    ("lung and spinal cord", "Lung, Spinal Cord", "OPEN", "correct"),
    ("a mass", "fibrosis", "OPEN", "other"),
])
def test_lexical_without_ground_truth(prediction, gold, answer_type, expected):
    assert classify_lexical(prediction, gold, answer_type) == expected
    assert classify(prediction, {"gold": gold, "answer_type": answer_type}) == (expected, True)


def test_ground_truth_is_used_when_present():
    assert classify("This is an MRI scan.", {**LEFT_LUNG, "question_type": "modality", "gold": "CT"}) == ("wrong_modality", False)
