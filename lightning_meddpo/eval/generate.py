"""Generation-based evaluation: batched generation, the VQA/report metrics, the predictions file.

Used by `PreferenceModule.test_step` / `predict_step` when the batch is an `EvalBatch` (from
`eval/datamodule.py`'s EvalDataModule):

- `generate(model, processor, batch)`: one batched `model.generate` on LEFT-padded prompts (the
  collator pads left, so every row's new tokens start at the same column); greedy by default. The
  settings (`GenerationSettings`) travel with the batch, so the module needs no generation init args.
- `EvalMetrics`: the torchmetrics per answer type — CLOSED: closed_accuracy (LLaVA-Med containment),
  closed_accuracy_strict and closed_accuracy_run_eval (LLaVA-Med run_eval.py's, its denominator included);
  OPEN: open_recall (LLaVA-Med's exactly), open_recall_clipped, open_exact_match, open_f1; REPORT: bleu, rouge_l and,
  when a judge is configured, nli/completeness and nli/hallucination (+ pooled). States are summed
  across ranks by torchmetrics, so `compute()` is the whole test set's value on every rank.
- `PredictionWriter`: a callback writing one JSON line per question (question_id, image, prompt,
  prediction, gold, answer_type) to `<log_dir>/predictions.jsonl` or a configured path. Under DDP each
  rank writes a part and rank 0 merges them (duplicates from the distributed sampler's padding dropped).
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection

from lightning_meddpo.checkpoints import writing
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
)

log = logging.getLogger(__name__)

ANSWER_TYPES = ("CLOSED", "OPEN", "REPORT")


@dataclass
class GenerationSettings:
    """How answers are generated. temperature 0 = greedy (the default); > 0 samples (seeded by the run's seed)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    num_beams: int = 1
    repetition_penalty: float = 1.0

    def generate_kwargs(self) -> dict[str, Any]:
        if self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"generation.temperature must be >= 0, got {self.temperature}")
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams,
            "repetition_penalty": self.repetition_penalty, "do_sample": self.temperature > 0,
        }
        if self.temperature > 0:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs


@dataclass
class JudgeSettings:
    """An OpenAI-compatible NLI judge for reports (eval/judge.py). The key is read from the env var
    NAMED `api_key_env`; use `cache_dir` so reruns send no requests."""

    url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    cache_dir: str | None = None
    max_workers: int = 8
    max_attempts: int = 5  # tries per request before the job stops (finished replies stay in cache_dir)
    backoff_base: float = 1.0  # seconds before the first retry, doubled after each

    def build(self):
        from lightning_meddpo.eval.judge import NLIJudge
        from lightning_meddpo.llm import LLMClient

        client = LLMClient(self.url, self.model, api_key_env=self.api_key_env, cache_dir=self.cache_dir,
                           max_attempts=self.max_attempts, backoff_base=self.backoff_base)
        return NLIJudge(client, max_workers=self.max_workers)


@dataclass
class EvalBatch:
    """Left-padded prompts with their images, and what is needed to score and write the answers."""

    ids: list[Any]  # question ids as in the file (int or str)
    input_ids: Tensor  # [B, L], left-padded
    attention_mask: Tensor  # [B, L]
    pixel_values: Tensor
    prompts: list[str]  # the user turn(s) as given, with the <image> placeholder
    golds: list[str | None]  # None when the file has no gold (predict only)
    answer_types: list[str]  # CLOSED / OPEN / REPORT
    images: list[str]  # image paths as written in the file
    extra: dict[str, Tensor] = field(default_factory=dict)  # processor extras (image_sizes, mm_token_type_ids, ...)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    judge: JudgeSettings | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, predictions: list[str]) -> list[dict[str, Any]]:
        """One predictions-file row per question."""
        return [
            {"question_id": qid, "image": image, "prompt": prompt, "prediction": pred, "gold": gold, "answer_type": atype}
            for qid, image, prompt, pred, gold, atype in zip(
                self.ids, self.images, self.prompts, predictions, self.golds, self.answer_types, strict=True)
        ]


@torch.no_grad()
def generate(model: nn.Module, processor: Any, batch: EvalBatch) -> list[str]:
    """Greedy (or sampled) answers for a batch, decoded without special tokens and stripped."""
    tokenizer = processor.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
        **batch.extra, **batch.generation.generate_kwargs(), pad_token_id=pad_id,
    )
    new_tokens = out[:, batch.input_ids.shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


class EvalMetrics(nn.Module):
    """The generation metrics of a test run: one torchmetrics MetricCollection per answer type (see module
    docstring), each updated with its questions only."""

    GROUPS = {
        "CLOSED": {"closed_accuracy": ClosedAccuracy, "closed_accuracy_strict": StrictClosedAccuracy,
                   "closed_accuracy_run_eval": ClosedAccuracyRunEval},
        "OPEN": {"open_recall": OpenRecall, "open_recall_clipped": ClippedOpenRecall, "open_exact_match": ExactMatch,
                 "open_f1": TokenF1},
        "REPORT": {"bleu": BLEU, "rouge_l": RougeL},
    }

    def __init__(self, judge: JudgeSettings | None = None):
        super().__init__()
        # compute_groups off: two metrics whose states happen to agree after a batch must not be merged
        self.groups = nn.ModuleDict({atype: MetricCollection({name: cls() for name, cls in metrics.items()},
                                                             compute_groups=False)
                                     for atype, metrics in self.GROUPS.items()})
        self.judge = judge.build() if judge is not None else None
        if self.judge is not None:
            from lightning_meddpo.eval.judge import NLIScores

            self.nli = NLIScores()

    def update(self, batch: EvalBatch, predictions: list[str]) -> None:
        for atype, group in self.groups.items():
            idx = [i for i, t in enumerate(batch.answer_types) if t == atype]
            if not idx:
                continue
            golds = [batch.golds[i] for i in idx]
            missing = [batch.ids[i] for i, g in zip(idx, golds) if g is None]
            if missing:
                raise ValueError(f"questions {missing[:5]} have no gold answer: `test` needs one (use `predict` to only generate)")
            preds = [predictions[i] for i in idx]
            group.update(preds, golds)
            if atype == "REPORT" and self.judge is not None:
                self.nli.update(self.judge.judge_many(preds, golds))

    def compute(self) -> dict[str, Tensor]:
        """Every metric that saw samples on any rank (NaN-valued, i.e. unused, metrics are left out)."""
        values: dict[str, Tensor] = {}
        with warnings.catch_warnings():
            # compute() runs on every rank, whatever it saw (it is a collective under DDP); a metric
            # no sample reached is NaN and left out, so its "compute before update" warning is noise.
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            for group in self.groups.values():
                values.update(group.compute())
            if self.judge is not None:
                values.update({f"nli/{name}": value for name, value in self.nli.compute().items()})
        return {name: value.float() for name, value in values.items() if not math.isnan(float(value))}

    def reset(self) -> None:
        for group in self.groups.values():
            group.reset()
        if self.judge is not None:
            self.nli.reset()


class PredictionWriter(L.Callback):
    """Writes the rows returned by test_step / predict_step on eval batches as JSONL.

    Ours rather than Lightning's BasePredictionWriter, which serves the predict loop only: this one writes
    `test` too, merges the ranks' files into one and drops the repeats the distributed sampler pads with.

    Args:
        path: the output file; default `<trainer.log_dir>/predictions.jsonl` (the run's log directory).
    """

    def __init__(self, path: str | None = None):
        self.path = path
        self._rows: list[dict[str, Any]] = []

    def _target(self, trainer: L.Trainer) -> Path:
        if self.path:
            return Path(self.path)
        return Path(trainer.log_dir or trainer.default_root_dir) / "predictions.jsonl"

    def _start(self, trainer, pl_module) -> None:
        self._rows = []

    def _collect(self, outputs: Any) -> None:
        if isinstance(outputs, list) and outputs and isinstance(outputs[0], dict) and "prediction" in outputs[0]:
            self._rows.extend(outputs)

    def _finish(self, trainer: L.Trainer) -> None:
        seen = trainer.strategy.reduce(torch.tensor(len(self._rows), dtype=torch.float64), reduce_op="sum")
        if float(seen) == 0:
            return  # not an evaluation run (e.g. `test` on preference pairs)
        target = self._target(trainer)
        rank, world = trainer.global_rank, trainer.world_size
        part = target.with_name(f"{target.name}.rank{rank}") if world > 1 else target.with_name(f"{target.name}.tmp")
        with writing(target, "the predictions", partial=part):  # a full disk: one line, no partial file
            part.parent.mkdir(parents=True, exist_ok=True)
            with part.open("w", encoding="utf-8") as f:
                for row in self._rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if world > 1:
            trainer.strategy.barrier("prediction_writer")
            if rank == 0:
                merged, seen_ids = [], set()
                for r in range(world):
                    p = target.with_name(f"{target.name}.rank{r}")
                    for line in p.read_text(encoding="utf-8").splitlines():
                        key = json.dumps(json.loads(line)["question_id"])
                        if key not in seen_ids:  # the distributed sampler pads with repeats
                            seen_ids.add(key)
                            merged.append(line)
                    p.unlink()
                tmp = target.with_name(f"{target.name}.tmp")
                tmp.write_text("".join(line + "\n" for line in merged), encoding="utf-8")
                os.replace(tmp, target)
        else:
            os.replace(part, target)
        if rank == 0:
            log.info("predictions written to %s", target)
            print(f"predictions written to {target}")
        self._rows = []

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._start(trainer, pl_module)

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self._start(trainer, pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer)


__all__ = ["ANSWER_TYPES", "EvalBatch", "EvalMetrics", "GenerationSettings", "JudgeSettings", "PredictionWriter", "generate"]
