"""NLI judge for generated reports: completeness and hallucination against the gold report.

1. `split_facts(gold)` splits the gold report into atomic facts with a simple, documented heuristic
   (no LLM): section headers such as "FINDINGS:" are dropped; the text is split at newlines, at
   bullets, and after ".", "!", "?" or ";" followed by whitespace — not at decimal points ("2.5 cm")
   nor after a few abbreviations ("e.g.", "i.e.", "vs.", "Dr.", "approx."); each piece is stripped of
   list markers ("1.", "-", "*"); pieces without any letter are dropped. Compound sentences ("A and
   B") stay one fact. Pass your own `splitter` to `NLIJudge` for anything smarter.
2. For each (prediction, fact) pair the judge LLM (an `LLMClient`) is asked for one label:
   Entailment / Partial Entailment / Neutral / Contradiction. One request per fact (not one per report
   with numbered facts) because a single-label reply is far easier to parse robustly, a bad reply costs
   one fact's retry instead of the report's, identical (prediction, fact) pairs share a cache entry,
   and the requests parallelise through `LLMClient.complete_many`. The cost is more requests.
3. `parse_label` reads a reply case-insensitively, tolerating extra words and punctuation ("**Label:
   partial entailment.**", "Contradiction - the report says left"). A reply that starts with a label
   gives that label; otherwise a reply naming exactly one label, not negated ("not entailment"),
   gives it; anything else (no label, several different ones, a negated one) is malformed. A malformed reply is retried up to `max_parse_attempts` times
   in the same conversation with a corrective follow-up turn (which is also cached, so reruns are
   free and deterministic); if still malformed the fact is counted as "unparsed" — never as Neutral.
4. Scores per report, over the facts with a parsed label (n = E + P + N + C; unparsed facts are
   reported separately, not counted in n): completeness = (E + 0.5 P) / n, hallucination = C / n.
   A report whose facts are all unparsed (or that has no facts) has NaN scores.

`NLIScores` is a torchmetrics `Metric` that sums the label counts (and the per-report scores) across
ranks. `compute()` gives macro scores (mean over scored reports, each report equal) and pooled scores
(all facts together), plus the counts. Typical test loop::

    judge = NLIJudge(LLMClient(url, model, cache_dir=...))
    metric = NLIScores()
    metric.update(judge.judge_many(preds, golds))     # in test_step
    metric.compute()                                  # in on_test_epoch_end (synced across ranks)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torchmetrics import Metric

from lightning_meddpo.llm import LLMClient, Message

__all__ = ["LABELS", "split_facts", "parse_label", "ReportJudgement", "NLIJudge", "NLIScores", "judge_messages"]

LABELS = ("entailment", "partial_entailment", "neutral", "contradiction")
UNPARSED = "unparsed"

# ---------------------------------------------------------------- fact splitting
_HEADER = re.compile(r"^\s*[A-Z][A-Z /&-]{2,40}:\s*", re.MULTILINE)
_ABBREV = re.compile(r"\b(e\.g|i\.e|vs|dr|mr|mrs|approx|fig)\.(?=\s)", re.IGNORECASE)
_SENT_END = re.compile(r"(?<=[.!?;])\s+|\n+|\s+(?=[\u2022\u25cf])")
_LIST_MARK = re.compile(r"^\s*(?:[-*\u2022\u25cf]+|\(?\d{1,2}[.)])\s+")
_PROTECT = "\u2024"


def split_facts(report: str) -> list[str]:
    """Split a gold report into atomic facts (sentence-level heuristic; see module docstring)."""
    text = _HEADER.sub("\n", report)
    text = _ABBREV.sub(lambda m: m.group(1) + _PROTECT, text)
    facts = []
    for piece in _SENT_END.split(text):
        piece = _LIST_MARK.sub("", piece.replace(_PROTECT, ".")).strip().rstrip(";,").rstrip()
        if any(ch.isalpha() for ch in piece):
            facts.append(piece)
    return facts


# ---------------------------------------------------------------- label parsing
_LABEL_RE = re.compile(
    r"partial(?:ly)?[\s_-]*entail\w*|contradict\w*|neutral\w*|entail\w*", re.IGNORECASE
)
_PREFIX = re.compile(r"^[^a-z]*(?:(?:final\s+)?(?:label|answer|verdict|judgement|judgment)\s*(?:is)?\s*[:=\-]?\s*)?[^a-z]*",
                     re.IGNORECASE)

_ALTERNATIVE = re.compile(r"\W*(?:or|/|and)\W*(?:partial|contradict|neutral|entail)", re.IGNORECASE)
_NEGATED = re.compile(r"\b(?:not|no|isn't|is\s+not|without|neither|nor)\s+(?:an?\s+|a\s+)?$", re.IGNORECASE)


def _canon(word: str) -> str:
    w = word.lower()
    if w.startswith("partial"):
        return "partial_entailment"
    if w.startswith("contradict"):
        return "contradiction"
    if w.startswith("neutral"):
        return "neutral"
    return "entailment"


def parse_label(reply: str) -> str | None:
    """The label in a judge reply, or None when it is malformed (no label, or conflicting labels)."""
    if not isinstance(reply, str):
        return None
    rest = reply[_PREFIX.match(reply).end():]
    head = _LABEL_RE.match(rest)
    if head:
        if _ALTERNATIVE.match(rest[head.end():]):  # "Entailment or Neutral": undecided
            return None
        return _canon(head.group())
    found = set()
    for m in _LABEL_RE.finditer(reply):
        if _NEGATED.search(reply[max(0, m.start() - 16):m.start()]):
            return None
        found.add(_canon(m.group()))
    return found.pop() if len(found) == 1 else None


# ---------------------------------------------------------------- prompts
SYSTEM_PROMPT = (
    "You are an expert radiologist evaluating a generated medical report against facts from the "
    "reference report. For the given fact, decide how the generated report relates to it."
)
USER_TEMPLATE = (
    "Generated report:\n{prediction}\n\n"
    "Fact from the reference report:\n{fact}\n\n"
    "Choose exactly one label:\n"
    "- Entailment: the generated report states this fact.\n"
    "- Partial Entailment: the generated report states part of the fact, or states it less specifically.\n"
    "- Neutral: the generated report does not mention the fact.\n"
    "- Contradiction: the generated report states something incompatible with the fact.\n"
    "Reply with the label only."
)
RETRY_PROMPT = (
    "Your reply could not be read. Reply with exactly one of: Entailment, Partial Entailment, "
    "Neutral, Contradiction — and nothing else."
)


def judge_messages(prediction: str, fact: str) -> list[Message]:
    """The first request for one (prediction, fact) pair."""
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_TEMPLATE.format(prediction=prediction.strip() or "(empty)",
                                                             fact=fact)}]


# ---------------------------------------------------------------- results
@dataclass
class ReportJudgement:
    """The judge's verdict on one report: one label (or None = unparsed) per gold fact."""

    facts: list[str]
    labels: list[str | None]
    replies: list[list[str]] = field(default_factory=list)  # every raw reply per fact, for auditing

    def count(self, label: str) -> int:
        if label == UNPARSED:
            return sum(lab is None for lab in self.labels)
        return sum(lab == label for lab in self.labels)

    @property
    def counts(self) -> dict[str, int]:
        return {lab: self.count(lab) for lab in (*LABELS, UNPARSED)}

    @property
    def n_scored(self) -> int:
        return sum(lab is not None for lab in self.labels)

    @property
    def completeness(self) -> float:
        n = self.n_scored
        if n == 0:
            return math.nan
        return (self.count("entailment") + 0.5 * self.count("partial_entailment")) / n

    @property
    def hallucination(self) -> float:
        n = self.n_scored
        return self.count("contradiction") / n if n else math.nan


class NLIJudge:
    """Labels every gold fact against a prediction with an LLM.

    Args:
        client: the `LLMClient` of the judge model (use a cache_dir: reruns then cost nothing).
        splitter: gold report -> facts (default `split_facts`).
        max_parse_attempts: total requests per fact before it is counted as unparsed (>= 1).
        max_workers: threads for concurrent requests.
    """

    def __init__(self, client: LLMClient, *, splitter: Callable[[str], list[str]] = split_facts,
                 max_parse_attempts: int = 2, max_workers: int = 8):
        if max_parse_attempts < 1:
            raise ValueError(f"max_parse_attempts must be >= 1, got {max_parse_attempts}")
        self.client, self.splitter = client, splitter
        self.max_parse_attempts, self.max_workers = max_parse_attempts, max_workers

    def _label_fact(self, conversation: list[Message], first_reply: str) -> tuple[str | None, list[str]]:
        replies = [first_reply]
        label = parse_label(first_reply)
        convo = list(conversation)
        while label is None and len(replies) < self.max_parse_attempts:
            convo += [{"role": "assistant", "content": replies[-1]}, {"role": "user", "content": RETRY_PROMPT}]
            replies.append(self.client.complete(convo))
            label = parse_label(replies[-1])
        return label, replies

    def judge_many(self, preds: Sequence[str], golds: Sequence[str]) -> list[ReportJudgement]:
        """One `ReportJudgement` per (prediction, gold report), in order. An `LLMError` (the judge
        unreachable after the client's retries) propagates: a failed request is not a label."""
        if isinstance(preds, str) or isinstance(golds, str):
            raise TypeError("preds and golds must be lists of strings")
        preds, golds = list(preds), list(golds)
        if len(preds) != len(golds):
            raise ValueError(f"got {len(preds)} predictions but {len(golds)} gold reports")
        facts = [self.splitter(g) for g in golds]
        jobs = [(i, judge_messages(p, f)) for i, (p, fs) in enumerate(zip(preds, facts)) for f in fs]
        first = self.client.complete_many([m for _, m in jobs], max_workers=self.max_workers)
        bad = [k for k, r in enumerate(first) if parse_label(r) is None]
        results: list[tuple[str | None, list[str]]] = [(parse_label(r), [r]) for r in first]
        if bad and self.max_parse_attempts > 1:
            with ThreadPoolExecutor(max_workers=max(1, min(self.max_workers, len(bad)))) as pool:
                fixed = list(pool.map(lambda k: self._label_fact(jobs[k][1], first[k]), bad))
            for k, res in zip(bad, fixed):
                results[k] = res
        out = [ReportJudgement(facts=fs, labels=[], replies=[]) for fs in facts]
        for (i, _), (label, replies) in zip(jobs, results):
            out[i].labels.append(label)
            out[i].replies.append(replies)
        return out

    def judge(self, pred: str, gold: str) -> ReportJudgement:
        return self.judge_many([pred], [gold])[0]

    def score(self, preds: Sequence[str], golds: Sequence[str]) -> tuple[list[ReportJudgement], dict[str, float]]:
        """Per-report judgements and the totals `NLIScores` would compute on them."""
        judgements = self.judge_many(preds, golds)
        metric = NLIScores()
        metric.update(judgements)
        return judgements, {k: float(v) for k, v in metric.compute().items()}


class NLIScores(Metric):
    """Label counts and per-report scores, all states summed across ranks.

    `update(judgements)` takes `ReportJudgement`s. `compute()` returns a dict of tensors:
    completeness / hallucination (macro: mean over scored reports), completeness_pooled /
    hallucination_pooled (over all scored facts), the counts entailment, partial_entailment,
    neutral, contradiction, unparsed, facts, reports, reports_unscored.
    """

    is_differentiable = False
    full_state_update = False

    _COUNTS = (*LABELS, UNPARSED, "reports", "reports_scored", "completeness_sum", "hallucination_sum")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in self._COUNTS:
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, judgements: Sequence[ReportJudgement]) -> None:
        if isinstance(judgements, ReportJudgement):
            judgements = [judgements]
        for j in judgements:
            if not isinstance(j, ReportJudgement):
                raise TypeError(f"expected ReportJudgement, got {type(j).__name__}")
            for lab, c in j.counts.items():
                setattr(self, lab, getattr(self, lab) + c)
            self.reports += 1
            if j.n_scored:
                self.reports_scored += 1
                self.completeness_sum += j.completeness
                self.hallucination_sum += j.hallucination

    def compute(self) -> dict[str, torch.Tensor]:
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.reports.device)
        scored = self.entailment + self.partial_entailment + self.neutral + self.contradiction
        per_report = self.reports_scored > 0
        pooled = scored > 0
        return {
            "completeness": self.completeness_sum / self.reports_scored if per_report else nan,
            "hallucination": self.hallucination_sum / self.reports_scored if per_report else nan,
            "completeness_pooled": (self.entailment + 0.5 * self.partial_entailment) / scored if pooled else nan,
            "hallucination_pooled": self.contradiction / scored if pooled else nan,
            "entailment": self.entailment.clone(),
            "partial_entailment": self.partial_entailment.clone(),
            "neutral": self.neutral.clone(),
            "contradiction": self.contradiction.clone(),
            "unparsed": self.unparsed.clone(),
            "facts": scored + self.unparsed,
            "reports": self.reports.clone(),
            "reports_unscored": self.reports - self.reports_scored,
        }
