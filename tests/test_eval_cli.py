"""Generation-based evaluation: EvalDataModule on quirky benchmark files, left-padded batched generation,
`test` / `predict` with the tiny model (in-process and as a CLI subprocess), predictions JSONL, metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_meddpo.data.records import RecordError
from lightning_meddpo.eval.datamodule import EvalDataModule, read_eval_file
from lightning_meddpo.eval.generate import (
    EvalBatch,
    GenerationSettings,
    PredictionWriter,
    generate,
)
from tests.conftest import REPO, run_cli, small_demo_args

try:
    from tests.llm_server import FakeLLMServer, last_user
except ImportError:  # pragma: no cover
    from llm_server import FakeLLMServer, last_user


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def vqa_file(tmp_path, demo_dir) -> Path:
    """LLaVA-Med style questions with the quirks real files have."""
    shutil.copytree(demo_dir / "images", tmp_path / "images", dirs_exist_ok=True)
    rows = [
        {"question_id": 1, "image": "images/test_00000.png", "text": "Is there a lesion in this image?",
         "answer": "yes", "answer_type": " closed "},  # stray whitespace, lower case, no placeholder
        {"question_id": 2, "image": "images/test_00001.png", "text": "<image>\nWhich organ is shown in this image?",
         "gpt4_answer": "The image shows the lung.", "answer_type": "Open"},  # gpt4_answer only
        {"question_id": "q3", "image": "images/test_00002.png", "text": "What is the imaging modality? <image>",
         "answer": "CT", "gpt4_answer": "This is a CT scan.", "answer_type": "OPEN"},  # both: answer wins
        {"question_id": 4, "image": "images/test_00003.png", "text": "Is there a lesion in this image?",
         "answer": "no"},  # no answer_type: inferred CLOSED
    ]
    return write_jsonl(tmp_path / "vqa.jsonl", rows)


@pytest.fixture()
def report_file(tmp_path, demo_dir) -> Path:
    shutil.copytree(demo_dir / "images", tmp_path / "images", dirs_exist_ok=True)
    rows = [
        {"id": "s1", "image_path": ["images/test_00004.png", "images/test_00005.png"],
         "report": "There is a lesion in the left side of the lung."},  # MIMIC-CXR: list, first used
        {"id": "s2", "image_path": "images/test_00006.png", "report": "This is an MRI scan. No lesion."},
        {"image_path": "images/test_00007.png", "caption": "The image shows the brain."},  # AMBOSS/NEJM: no id
    ]
    return write_jsonl(tmp_path / "reports.jsonl", rows)


def test_vqa_quirks(vqa_file):
    records, report = read_eval_file(vqa_file, image_placement="keep")
    by_id = {r.id: r for r in records}
    assert [r.answer_type for r in records] == ["CLOSED", "OPEN", "OPEN", "CLOSED"]
    assert by_id[1].prompt[0].text == "<image>\nIs there a lesion in this image?"
    assert by_id[2].prompt[0].text.count("<image>") == 1
    assert by_id["q3"].prompt[0].text == "What is the imaging modality? <image>"  # kept where it was
    assert by_id[2].gold == "The image shows the lung."
    assert by_id["q3"].gold == "CT"
    assert by_id[1].image == (vqa_file.parent / "images/test_00000.png").resolve()
    notes = report.notes
    assert notes["had no <image> placeholder (inserted)"] == 2
    assert notes["gold from gpt4_answer"] == 1 and notes["gold from answer"] == 3
    assert notes["had answer_type in another spelling (normalised)"] == 2
    assert notes["had no answer_type (inferred from the gold: yes/no = CLOSED)"] == 1
    assert "4 records read (2 CLOSED, 2 OPEN)" in report.summary()
    # the default, as LLaVA-Med's model_vqa.py (the paper's inference): <image> moved before the question
    records, report = read_eval_file(vqa_file)
    assert {r.id: r.prompt[0].text for r in records}["q3"] == "<image>\nWhat is the imaging modality?"
    assert all(r.prompt[0].text.startswith("<image>\n") and r.prompt[0].text.count("<image>") == 1 for r in records)
    assert report.notes["had <image> elsewhere (moved to the front, as LLaVA-Med's model_vqa.py)"] >= 1
    # answer_field picks the field explicitly
    records, _ = read_eval_file(vqa_file, answer_field="gpt4_answer", skip_invalid=True)
    assert {r.id: r.gold for r in records}["q3"] == "This is a CT scan."


def test_report_quirks(report_file):
    records, report = read_eval_file(report_file, report_prompt="Write the report.")
    assert [r.answer_type for r in records] == ["REPORT"] * 3
    assert records[0].image.name == "test_00004.png"  # the first of the list
    assert records[0].image_field == "images/test_00004.png"
    assert records[2].id == "reports:3" and records[2].gold == "The image shows the brain."
    assert records[0].prompt[0].text == "<image>\nWrite the report."
    assert report.notes["had image_path lists of several images (the first was used)"] == 1
    assert report.notes["had no id (file:line used)"] == 1


def test_bad_records_name_the_record(tmp_path, demo_dir):
    shutil.copytree(demo_dir / "images", tmp_path / "images")
    bad = [
        {"question_id": 7, "image": "../outside.png", "text": "q", "answer": "yes", "answer_type": "CLOSED"},
        {"question_id": 8, "image": "images/test_00000.png", "text": "q", "answer": "yes", "answer_type": "maybe"},
        {"question_id": 9, "image": "images/test_00000.png", "text": "q", "answer_type": "OPEN"},
        {"question_id": 10, "image": "images/test_00000.png", "text": "q", "answer": "yes", "answer_type": "CLOSED"},
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", bad)
    with pytest.raises(RecordError, match=r"bad.jsonl:1 id='7': field 'image'.*escapes the image root"):
        read_eval_file(path)
    records, report = read_eval_file(path, skip_invalid=True)
    assert [r.id for r in records] == [10]
    assert sum(report.skipped.values()) == 3
    assert any("id='8': field 'answer_type'" in e for e in report.errors)
    assert any("id='9': field 'answer'" in e for e in report.errors)
    # predict needs no gold
    records, _ = read_eval_file(path, require_gold=False, skip_invalid=True)
    assert 9 in [r.id for r in records]


def test_left_padded_batch_generates_like_single_prompts(vqa_file, tiny_processor):
    from lightning_meddpo.backbones.loader import load_model

    dm = EvalDataModule(test_file=str(vqa_file), batch_size=4, processor=tiny_processor,
                        generation={"max_new_tokens": 6})
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert isinstance(batch, EvalBatch) and batch.generation == GenerationSettings(max_new_tokens=6)
    assert batch.answer_types == ["CLOSED", "OPEN", "OPEN", "CLOSED"]
    lengths = batch.attention_mask.sum(1)
    assert lengths.min() < lengths.max(), "prompts of different lengths are needed to test padding"
    assert bool(batch.attention_mask[:, -1].all()), "left padding: every prompt ends in the last column"
    pad = tiny_processor.tokenizer.pad_token_id
    assert bool((batch.input_ids[batch.attention_mask == 0] == pad).all())

    model = load_model("tiny://llama").eval()
    batched = generate(model, tiny_processor, batch)
    single = []
    loader = torch.utils.data.DataLoader(dm.datasets["test"], batch_size=1, collate_fn=dm.test_dataloader().collate_fn)
    for one in loader:
        single += generate(model, tiny_processor, one)
    assert batched == single
    assert all(isinstance(p, str) for p in batched)


def test_test_and_predict_in_process(tmp_path, report_file, vqa_file):
    """Reports: BLEU / ROUGE-L and the NLI judge on a local server; predict writes to a configured path."""
    from lightning_meddpo.modules import SFT

    labels = iter(["Entailment", "Contradiction", "Neutral", "Partial Entailment"] * 10)
    with FakeLLMServer(lambda body: next(labels) if "Fact" in last_user(body) else "Neutral") as server:
        module = SFT(backbone="tiny://llama")
        dm = EvalDataModule(test_file=str(report_file), batch_size=2, processor=module.processor,
                            generation={"max_new_tokens": 4},
                            judge={"url": server.url, "model": "judge", "cache_dir": str(tmp_path / "judge")})
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path)
        result = trainer.test(module, datamodule=dm)[0]
        assert server.count >= 4
    for name in ("test/bleu", "test/rouge_l", "test/nli/completeness", "test/nli/hallucination", "test/nli/facts"):
        assert name in result, sorted(result)
    assert 0 <= result["test/rouge_l"] <= 1 and result["test/nli/facts"] == 4
    assert "test/closed_accuracy" not in result  # no questions of that type: not logged
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == ["s1", "s2", "reports:3"]
    assert rows[0]["image"] == "images/test_00004.png" and rows[0]["answer_type"] == "REPORT"

    out = tmp_path / "out" / "answers.jsonl"
    dm = EvalDataModule(predict_file=str(vqa_file), batch_size=3, processor=module.processor,
                        generation={"max_new_tokens": 3})
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[PredictionWriter(str(out))])
    trainer.predict(module, datamodule=dm)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [1, 2, "q3", 4]
    assert set(rows[0]) == {"question_id", "image", "prompt", "prediction", "gold", "answer_type"}


def test_cli_test_subcommand_writes_predictions_and_metrics(tmp_path, demo_dir):
    from lightning_meddpo.eval.tensorboard import read_scalars

    args = [a for a in small_demo_args(demo_dir, tmp_path) if "_file=" not in a and "demo=" not in a]
    run_cli("test", "--config", "configs/formulations/sft.yaml", "--config", "configs/backbones/demo.yaml", "--data", "configs/eval/demo_vqa.yaml",
            f"--data.init_args.test_file={demo_dir / 'vqa_test.jsonl'}", "--data.init_args.demo=false",
            "--data.init_args.generation.max_new_tokens=4", *args)
    (version,) = (tmp_path / "demo" / "sft").iterdir()
    rows = [json.loads(line) for line in (version / "predictions.jsonl").read_text().splitlines()]
    questions = [json.loads(line) for line in (demo_dir / "vqa_test.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [q["question_id"] for q in questions]
    assert [r["gold"] for r in rows] == [q["answer"] for q in questions]
    assert all(r["prompt"].startswith("<image>\n") for r in rows)  # the demo questions lack the placeholder
    scalars = read_scalars(version)
    for tag in ("test/closed_accuracy", "test/closed_accuracy_strict", "test/closed_accuracy_run_eval", "test/open_recall",
                "test/open_recall_clipped", "test/open_exact_match", "test/open_f1"):
        assert tag in scalars, sorted(scalars)
        assert 0.0 <= scalars[tag][-1][1] <= 1.0


def test_test_on_preference_pairs_keeps_the_preference_metrics(tmp_path, demo_dir):
    """test_step dispatches on the batch type: preference pairs still give test/loss and rewards, no predictions file."""
    from lightning_meddpo.data.datamodule import PreferenceDataModule
    from lightning_meddpo.modules import SFT

    module = SFT(backbone="tiny://llama")
    dm = PreferenceDataModule(test_file=str(demo_dir / "test.json"), batch_size=8, max_length=128, processor=module.processor)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, limit_test_batches=1)
    result = trainer.test(module, datamodule=dm)[0]
    assert "test/loss" in result and "test/rewards/accuracies" in result
    assert not any(k.startswith("test/closed") for k in result)
    assert not (tmp_path / "predictions.jsonl").exists()


def test_paper_inference_prompt_mistral_instruct_one_bos(vqa_file, tiny_processor):
    """configs/eval/vqa.yaml: LLaVA-Med's mistral_instruct conversation with `<image>\n` + question, as the
    paper's vqa_inference.sh ran it, tokenised with exactly one BOS (the template writes it)."""
    import yaml

    from lightning_meddpo.eval.datamodule import EvalDataModule

    settings = yaml.safe_load((REPO / "configs/eval/vqa.yaml").read_text())["init_args"]
    assert settings["chat_template"] == "mistral_instruct" and settings["image_placement"] == "front"
    dm = EvalDataModule(test_file=str(vqa_file), processor=tiny_processor, chat_template="mistral_instruct")
    dm.setup("test")
    item = dm.datasets["test"][2]  # q3: "What is the imaging modality? <image>"
    text = tiny_processor.tokenizer.decode(item.input_ids)
    assert text.startswith("<s>[INST] <image>") and text.endswith("What is the imaging modality? [/INST]")
    assert int((item.input_ids == tiny_processor.tokenizer.bos_token_id).sum()) == 1


def test_a_judge_that_fails_for_good_ends_the_job_in_one_line_and_the_rerun_resumes(tmp_path, demo_dir, report_file):
    """From its 3rd request on the judge answers HTTP 200 with truncated JSON: `test` ends with one line naming the
    URL (exit 2), the finished answers stay cached, and the rerun (the judge healthy again) asks only for the rest."""
    import os
    import subprocess
    import sys

    answered: list[str] = []
    broken = {"after": 2}

    def judge_reply(body):
        if broken["after"] is not None and len(answered) >= broken["after"]:
            return 200, '{"id": "cmpl", "choices": [{"message": {"role": "assistant", "content": "ENTAI'
        answered.append(last_user(body))
        return "ENTAILMENT"

    args = [a for a in small_demo_args(demo_dir, tmp_path) if "_file=" not in a and "demo=" not in a]
    cache = tmp_path / "judge_cache"

    def test_job(url: str) -> subprocess.CompletedProcess:
        judge = json.dumps({"url": url, "model": "judge", "cache_dir": str(cache), "max_workers": 1,
                            "max_attempts": 2, "backoff_base": 0.01})
        return subprocess.run(
            [sys.executable, "-m", "lightning_meddpo", "test", "--config", "configs/formulations/sft.yaml", "--config",
             "configs/backbones/demo.yaml", "--data", "configs/eval/report.yaml", f"--data.init_args.test_file={report_file}",
             "--data.init_args.demo=false", "--data.init_args.generation.max_new_tokens=12",
             f"--data.init_args.judge={judge}", *args],
            cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})

    with FakeLLMServer(judge_reply) as srv:
        proc = test_job(srv.url)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        (line,) = [line for line in proc.stderr.splitlines() if ": error: " in line]
        assert srv.url in line and "2 attempt(s)" in line
        assert len(list(cache.rglob("*.json"))) == 2  # the finished answers
        broken["after"] = None
        proc = test_job(srv.url)
        assert proc.returncode == 0, proc.stderr[-3000:]
    first, rerun = answered[:2], answered[2:]
    assert rerun and not set(first) & set(rerun)  # nothing asked twice
    assert len(list(cache.rglob("*.json"))) == len(answered)
