"""EvalDataModule: benchmark questions and report files -> left-padded prompt batches for generation.

Formats (docs/design.md section 5), one record per JSONL line or JSON array element; `format: auto` decides
per record (a `text` field: VQA; else a report file):

- LLaVA-Med benchmark questions (VQA-RAD, SLAKE, PathVQA): `question_id` (or `id`), `image`, `text`
  (the question), the gold in `answer` or `gpt4_answer` (`answer` wins when both are present; set
  `answer_field` to choose), `answer_type` CLOSED/OPEN in any capitalisation and with stray whitespace.
  A question without the `<image>` placeholder gets one inserted before it (counted, reported).
  A missing answer_type is inferred (gold yes/no: CLOSED, else OPEN) and counted.
- Report generation: MIMIC-CXR (`id` or `study_id`, `image_path` or `image_paths` as a list or a string, `report`) and AMBOSS/NEJM
  (`image_path`, `caption`). One image per prompt is supported: of a list, the FIRST image is used
  (counted, reported). The prompt is `report_prompt` (configurable). A record without an id gets
  `<file stem>:<line>` (counted).

Every problem names the file, line, record id and field (RecordError); with `skip_invalid` bad records
are counted and reported instead. Image paths are resolved inside `image_root` (default: the file's
directory) and may not escape it. Generation and judge settings are DataModule arguments: they ride
on each `EvalBatch`, so the LightningModule stays free of evaluation options.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_meddpo.backbones.templates import get_chat_template
from lightning_meddpo.data.batch import pad_stack
from lightning_meddpo.data.collate import PairEncoder, PromptTooLongError
from lightning_meddpo.data.images import load_image
from lightning_meddpo.data.llava_med import read_llava_med
from lightning_meddpo.data.records import (
    IMAGE_TOKEN,
    RecordError,
    Turn,
    default_id,
    load_json_records,
    resolve_image,
    valid_rows,
)
from lightning_meddpo.eval.generate import EvalBatch, GenerationSettings, JudgeSettings

log = logging.getLogger(__name__)

DEFAULT_REPORT_PROMPT = "Describe the findings in this medical image."
Format = Literal["auto", "vqa", "report"]


@dataclass(frozen=True)
class EvalRecord:
    """One question (or report prompt) with its image and gold answer."""

    id: Any  # as in the file (LLaVA-Med question ids are often ints)
    image: Path  # resolved, inside the image root
    image_field: str  # as written in the file
    prompt: tuple[Turn, ...]
    gold: str | None
    answer_type: str  # CLOSED / OPEN / REPORT
    source: str = ""


@dataclass
class EvalReadReport:
    """What reading an evaluation file did, by outcome: nothing happens unseen."""

    read: int = 0
    by_type: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)  # quirk -> count (placeholder inserted, first image used, ...)
    skipped: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.by_type.items()))
        parts = [f"{self.read} records read ({types})" if types else f"{self.read} records read"]
        parts += [f"{n} {note}" for note, n in sorted(self.notes.items())]
        parts += [f"{n} skipped: {reason}" for reason, n in sorted(self.skipped.items())]
        return "; ".join(parts)


def _answer_type(raw: dict, gold: str | None, source: str, rid: Any, notes: Counter) -> str:
    value = raw.get("answer_type")
    if value is None:
        if gold is None:
            return "OPEN"
        from lightning_meddpo.eval.metrics import normalize_answer

        notes["had no answer_type (inferred from the gold: yes/no = CLOSED)"] += 1
        return "CLOSED" if normalize_answer(gold) in ("yes", "no") else "OPEN"
    if not isinstance(value, str) or value.strip().upper() not in ("CLOSED", "OPEN"):
        raise RecordError(source, str(rid), "answer_type", f"expected CLOSED or OPEN, got {value!r}")
    canonical = value.strip().upper()
    if value != canonical:
        notes["had answer_type in another spelling (normalised)"] += 1
    return canonical


def _with_placeholder(text: str, source: str, rid: Any, name: str, notes: Counter, placement: str = "front") -> str:
    """The question with one image placeholder. "front": as LLaVA-Med's model_vqa.py (the paper's VQA
    inference), every `<image>` removed and `<image>\n` put before the stripped question; "keep": the file's
    placement (one placeholder at most), inserted in front when absent. Changes are counted in `notes`."""
    count = text.count(IMAGE_TOKEN)
    if placement == "front":
        question = text.replace(IMAGE_TOKEN, "").strip()
        if count == 0:
            notes[f"had no {IMAGE_TOKEN} placeholder (put in front)"] += 1
        elif not text.startswith(f"{IMAGE_TOKEN}\n") or count > 1:
            notes[f"had {IMAGE_TOKEN} elsewhere (moved to the front, as LLaVA-Med's model_vqa.py)"] += 1
        return f"{IMAGE_TOKEN}\n{question}"
    if count > 1:
        raise RecordError(source, str(rid), name, f"{count} {IMAGE_TOKEN} placeholders; one image per question is supported")
    if count == 0:
        notes[f"had no {IMAGE_TOKEN} placeholder (inserted)"] += 1
        return f"{IMAGE_TOKEN}\n{text}"
    return text


def parse_eval_record(
    raw: Any, source: str, image_root: Path, notes: Counter, *, fmt: Format = "auto",
    answer_field: str | None = None, report_prompt: str = DEFAULT_REPORT_PROMPT, require_gold: bool = True,
    missing_id: str | None = None, image_placement: str = "front",
) -> EvalRecord:
    """Parse one benchmark question or report record (the LLaVA-Med formats' one reader, data/llava_med.py; see
    the module docstring); quirks are counted in `notes`."""
    kind = fmt if fmt != "auto" else ("vqa" if isinstance(raw, dict) and "text" in raw else "report")
    record = read_llava_med(raw, source, notes, kind=kind, answer_field=answer_field, require_answer=require_gold,
                            missing_id=missing_id)
    rid = record.id
    gold = record.answer
    if gold is not None and not gold.strip():
        raise RecordError(source, str(rid), record.answer_field, "is empty")
    if kind == "vqa":
        if record.answer_field and not answer_field:
            notes[f"gold from {record.answer_field}"] += 1
        answer_type = _answer_type(raw, gold, source, rid, notes)
        prompt = _with_placeholder(record.turns[0].text, source, rid, "text", notes, image_placement)
    else:
        answer_type = "REPORT"
        prompt = report_prompt if IMAGE_TOKEN in report_prompt else f"{IMAGE_TOKEN}\n{report_prompt}"
    image = resolve_image(image_root, record.image_value, source, str(rid), record.image_field)
    return EvalRecord(id=rid, image=image, image_field=record.image_value, prompt=(Turn("human", prompt),), gold=gold,
                      answer_type=answer_type, source=source)


def read_eval_file(
    path: str | Path, image_root: str | Path | None = None, *, fmt: Format = "auto", answer_field: str | None = None,
    report_prompt: str = DEFAULT_REPORT_PROMPT, require_gold: bool = True, skip_invalid: bool = False,
    image_placement: str = "front",
) -> tuple[list[EvalRecord], EvalReadReport]:
    """Read and validate an evaluation file. Errors raise unless skip_invalid, which counts and reports them."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    report = EvalReadReport()
    records: list[EvalRecord] = []

    def skip(e: RecordError) -> None:
        report.skipped[f"field {e.field_name}: {e.problem.split(':')[0]}"] += 1
        report.errors.append(str(e))

    def parse(raw: Any, source: str, index: int) -> EvalRecord:
        return parse_eval_record(
            raw, source, root, report.notes, fmt=fmt, answer_field=answer_field, report_prompt=report_prompt,
            require_gold=require_gold, missing_id=default_id(source), image_placement=image_placement,
        )

    for record in valid_rows(load_json_records(path), parse, skip, skip_invalid, id_field="question_id"):
        report.read += 1
        report.by_type[record.answer_type] += 1
        records.append(record)
    return records, report


@dataclass
class EvalItem:
    record: EvalRecord
    input_ids: torch.Tensor  # [L]
    pixel_values: torch.Tensor
    token_extra: dict[str, torch.Tensor]  # per-token extras, [L]
    image_extra: dict[str, torch.Tensor]


class EvalDataset(Dataset):
    """Encodes one prompt per item: chat template with the generation prompt, image through the processor."""

    def __init__(self, records: list[EvalRecord], encoder: PairEncoder, max_length: int | None = None):
        self.records, self.encoder, self.max_length = records, encoder, max_length

    def __len__(self) -> int:
        return len(self.records)

    def prompt_text(self, record: EvalRecord) -> str:
        return self.encoder.render_prompt(record.prompt)

    def __getitem__(self, index: int) -> EvalItem:
        """The prompt tokenised exactly as in training (one BOS, image tokens expanded by the processor)."""
        record = self.records[index]
        image = load_image(record.image, record_id=str(record.id))
        encoded = self.encoder.encode_prompt(self.prompt_text(record), image)
        input_ids = encoded.tokens["input_ids"]
        if self.max_length is not None and input_ids.numel() > self.max_length:
            raise PromptTooLongError(
                f"{record.source} id={record.id!r}: the prompt with its image tokens is {input_ids.numel()} tokens, "
                f"more than max_length={self.max_length}")
        token_extra = {k: v for k, v in encoded.tokens.items() if k != "input_ids"}
        return EvalItem(record, input_ids, encoded.image.pixel_values, token_extra, dict(encoded.image.extra))


@dataclass
class EvalCollator:
    """LEFT-pads prompts (generation appends to the right) into an EvalBatch carrying the settings."""

    pad_token_id: int
    generation: GenerationSettings
    judge: JudgeSettings | None = None

    def __call__(self, items: list[EvalItem]) -> EvalBatch:
        extra = {k: pad_stack([it.token_extra[k] for it in items], 0, side="left") for k in items[0].token_extra}
        extra.update({k: torch.cat([it.image_extra[k] for it in items]) for k in items[0].image_extra})
        return EvalBatch(
            ids=[it.record.id for it in items],
            input_ids=pad_stack([it.input_ids for it in items], self.pad_token_id, side="left"),
            attention_mask=pad_stack([torch.ones_like(it.input_ids) for it in items], 0, side="left"),
            pixel_values=torch.cat([it.pixel_values for it in items]),
            prompts=[it.record.prompt[-1].text for it in items],
            golds=[it.record.gold for it in items],
            answer_types=[it.record.answer_type for it in items],
            images=[it.record.image_field for it in items],
            extra=extra,
            generation=self.generation,
            judge=self.judge,
        )


class EvalDataModule(L.LightningDataModule):
    """Benchmark questions / report prompts for `test` (generate + metrics) and `predict` (generate only).

    Args:
        test_file: LLaVA-Med question file or report file (JSONL or JSON array) for `test`.
        predict_file: file for `predict` (default: test_file); golds are optional there.
        image_root: directory image paths are relative to (default: the file's directory).
        format: `auto` (per record: a `text` field means a question), `vqa` or `report`.
        answer_field: the gold's field (default: `answer`, else `gpt4_answer`; reports: `report`, else `caption`).
        report_prompt: the instruction for report records (the `<image>` placeholder goes before it).
        batch_size, num_workers: DataLoader settings (prompts are left-padded).
        max_length: fail on a prompt (with image tokens) longer than this, naming the record.
        image_placeholder: what replaces `<image>` in prompts (default: the processor's image token, for Qwen-VL
            wrapped as `<|vision_start|><|image_pad|><|vision_end|>`).
        chat_template: a template name (backbones/templates.py) for the generation prompts; default: the
            model's. The paper ran LLaVA-Med's VQA inference with `mistral_instruct` (vqa_inference.sh), though
            its training used `v1`: configs/eval/vqa.yaml sets it.
        image_placement: "front" (LLaVA-Med's model_vqa.py, the paper's inference: `<image>` removed from the
            question and `<image>\n` put in front) or "keep" (the file's placement).
        generation: max_new_tokens, temperature (0 = greedy), top_p, num_beams, repetition_penalty.
        judge: an OpenAI-compatible NLI judge for reports (url, model, api_key_env, cache_dir).
        limit: evaluate only the first N records (smoke tests).
        skip_invalid: count and report invalid records instead of raising on the first.
        demo: generate the synthetic demo dataset (with its vqa_test.jsonl) into the file's directory if missing.
    """

    def __init__(
        self,
        test_file: str | None = None,
        predict_file: str | None = None,
        image_root: str | None = None,
        format: Format = "auto",
        answer_field: str | None = None,
        report_prompt: str = DEFAULT_REPORT_PROMPT,
        batch_size: int = 8,
        num_workers: int = 0,
        max_length: int | None = None,
        image_placeholder: str | None = None,
        chat_template: str | None = None,
        image_placement: Literal["front", "keep"] = "front",
        generation: GenerationSettings | None = None,
        judge: JudgeSettings | None = None,
        limit: int | None = None,
        skip_invalid: bool = False,
        demo: bool | dict[str, Any] = False,
        seed: int = 0,
        processor: Any = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["processor"])
        self.processor = processor
        self.generation = _as(generation, GenerationSettings) or GenerationSettings()
        self.judge = _as(judge, JudgeSettings)
        self.datasets: dict[str, EvalDataset] = {}
        self.reports: dict[str, EvalReadReport] = {}

    def prepare_data(self) -> None:
        h = self.hparams
        if h.demo:
            from lightning_meddpo.registry import data_maker

            options = h.demo if isinstance(h.demo, dict) else {}
            data_maker("demo")([h.test_file, h.predict_file], **{"seed": h.seed, **options})

    def _dataset(self, path: str, require_gold: bool) -> EvalDataset:
        if self.processor is None:
            raise ValueError("EvalDataModule needs the backbone's processor (the CLI links it from the model)")
        h = self.hparams
        records, report = read_eval_file(
            path, h.image_root, fmt=h.format, answer_field=h.answer_field, report_prompt=h.report_prompt,
            require_gold=require_gold, skip_invalid=h.skip_invalid, image_placement=h.image_placement,
        )
        if h.limit is not None:
            records = records[: h.limit]
        self.reports[path] = report
        log.info("%s: %s", path, report.summary())
        print(f"{path}: {report.summary()}")
        for err in report.errors[:20]:
            log.warning("skipped %s", err)
        if not records:
            raise ValueError(f"{path}: no usable records ({report.summary()})")
        template = get_chat_template(h.chat_template) if h.chat_template else None
        encoder = PairEncoder(self.processor, h.max_length or 1 << 30, h.image_placeholder, chat_template=template)
        return EvalDataset(records, encoder, h.max_length)

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if stage in ("fit", "validate"):
            raise ValueError("EvalDataModule serves `test` and `predict` only; train with PreferenceDataModule")
        if stage in ("test", None) and "test" not in self.datasets:
            if not h.test_file:
                raise ValueError("set data.init_args.test_file for `test`")
            self.datasets["test"] = self._dataset(h.test_file, require_gold=True)
        if stage in ("predict", None) and "predict" not in self.datasets and (h.predict_file or h.test_file):
            self.datasets["predict"] = self._dataset(h.predict_file or h.test_file, require_gold=False)

    def _loader(self, split: str) -> DataLoader:
        tokenizer = self.processor.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return DataLoader(
            self.datasets[split], batch_size=self.hparams.batch_size, shuffle=False,
            num_workers=self.hparams.num_workers, collate_fn=EvalCollator(pad_id, self.generation, self.judge),
        )

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")


def _as(value: Any, cls: type) -> Any:
    """jsonargparse may hand a dataclass arg over as a Namespace or dict."""
    if value is None or isinstance(value, cls):
        return value
    return cls(**(vars(value) if hasattr(value, "__dict__") else dict(value)))


__all__ = ["DEFAULT_REPORT_PROMPT", "EvalCollator", "EvalDataModule", "EvalDataset", "EvalReadReport", "EvalRecord",
           "parse_eval_record", "read_eval_file"]
