"""One reader per input format: a LLaVA-Med record means the same to build-pairs and to evaluation, and every
reader (the paper's pairs too) applies the same image-path rule and the same turn-list check."""

from __future__ import annotations

from collections import Counter

import pytest
from PIL import Image

from lightning_meddpo.commands.sources import parse_source_record
from lightning_meddpo.data.records import RecordError, parse_paper_record
from lightning_meddpo.eval.datamodule import parse_eval_record


@pytest.fixture
def root(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "ct.png")
    return tmp_path


def test_a_question_reads_the_same_for_build_pairs_and_evaluation(root):
    raw = {"question_id": 7, "image": ["images/ct.png", "images/other.png"], "text": "Is there a nodule?",
           "gpt4_answer": 3, "answer_type": "open"}
    item = parse_source_record(raw, "q.jsonl:1")
    record = parse_eval_record(raw, "q.jsonl:1", root, Counter())
    assert item.id == str(record.id) == "7"
    assert (root / item.image).resolve() == record.image
    assert item.answer == record.gold == "3"
    assert item.question == record.prompt[0].text.replace("<image>", "").strip() == "Is there a nodule?"


def test_a_report_without_an_id_gets_the_same_file_and_line(root):
    raw = {"image_path": "images/ct.png", "caption": "Normal."}
    notes = Counter()
    item = parse_source_record(raw, "amboss.jsonl:4")
    record = parse_eval_record(raw, "amboss.jsonl:4", root, notes, missing_id="amboss:4")
    assert item.id == record.id == "amboss:4" and notes["had no id (file:line used)"] == 1


@pytest.mark.parametrize("bad", ["/etc/x.png", "../x.png", "images/../../x.png", "C:/images/ct.png",
                                 "images\\..\\..\\x.png"])
def test_one_image_path_rule_in_every_reader(root, bad):
    question = {"question_id": "q", "image": bad, "text": "Q?", "answer": "yes"}
    paper = {"id": "p", "image": bad, "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                                        {"from": "gpt", "value": "yes"}],
             "rejected_conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "no"}]}
    for read in (lambda: parse_source_record(question, "s"), lambda: parse_eval_record(question, "s", root, Counter()),
                 lambda: parse_paper_record(paper, "s", root)):
        with pytest.raises(RecordError, match="escapes the image root") as caught:
            read()
        assert caught.value.reason == "field image: image path escapes the image root"


def test_one_turn_list_check_for_conversations(root):
    turns = [{"from": "user", "value": "<image>\nQ?"}, {"from": "assistant", "value": "left"},
             {"from": "human", "value": "and?"}]
    conversation = {"id": "c", "image": "images/ct.png", "conversations": turns}
    paper = {"id": "c", "image": "images/ct.png", "conversations": turns, "rejected_conversations": turns}
    for read in (lambda: parse_source_record(conversation, "s"), lambda: parse_paper_record(paper, "s", root)):
        with pytest.raises(RecordError, match=r"'conversations\[2\]': turns after the last gpt turn"):
            read()
