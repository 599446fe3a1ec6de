"""Text metrics for medical VQA and report generation, as torchmetrics `Metric`s.

Every metric takes ``update(preds: list[str], golds: list[str])`` and keeps only summed tensor states
(``dist_reduce_fx="sum"``), so ``compute()`` gives the same value on every rank after a DDP/FSDP sync
as a single process would on the whole data. Sums are float64 (exact for counts and stable for
thousands of per-sample scores). With no samples, ``compute()`` returns NaN (not 0).

Normalisation (`normalize_answer`, `tokens`, defined in lightning_meddpo/text.py and re-exported here),
shared by all metrics, follows LLaVA-Med's
``normalize_word`` in spirit: lower-case; apostrophes dropped ("patient's" -> "patients"); thousands
commas in numbers removed; a period is kept only between digits ("2.5"); every other punctuation mark
becomes a space; number words zero..ten become digits; the articles a/an/the are dropped; whitespace
collapsed. Unlike LLaVA-Med, "none" is not mapped to "0".

VQA metrics:
- `ClosedAccuracy` — LLaVA-Med's reported closed-question accuracy: a hit when the normalised gold
  answer is a *substring* of the normalised prediction. Faithful quirk: gold "no" hits prediction
  "nodule seen". (LLaVA-Med's script additionally requires "yes" or "no" to occur somewhere in the
  prediction, which zeroes non-yes/no closed answers such as "lung"; pass ``require_yes_no=True`` to
  reproduce that too. Default False.)
- `StrictClosedAccuracy` — yes/no gold: the first token of the prediction that is "yes" or "no"
  decides (none: miss); other gold: normalised exact match.
- `ClosedAccuracyRunEval` — LLaVA-Med's `llava/eval/run_eval.py` yes/no accuracy exactly: after its own
  `normalize_word`, a prediction containing "yes" or "no" (substrings: "nodule" counts) is a hit if it
  contains the gold; a prediction with neither counts as a miss; but a prediction containing yes/no WITHOUT
  the gold is left out of the denominator (run_eval appends nothing for it), so wrong yes/no answers raise
  this accuracy instead of lowering it. `closed_accuracy` counts every question; `closed_accuracy_strict`
  lets only the first yes/no word decide. Report all three; compare runs on the same one.
- `OpenRecall` — LLaVA-Med's reported open-question recall exactly (`calculate_f1score` in its
  eval_metrics/evaluate_metrics.py, after its `normalize_word`): tp counts every occurrence of a gold word in
  the prediction, so a prediction repeating "lung" 15 times scores 15/17 = 0.88 against "Lung, Spinal Cord".
- `ClippedOpenRecall` — ours: share of gold tokens found in the prediction, each matched at most as often as
  it occurs in the gold (0.33 for the example above), averaged over questions.
- `ExactMatch` — normalised string equality. `TokenF1` — SQuAD-style token F1 (multiset overlap).

Report metrics (on `tokens(text, answer_mode=False)`: lower-cased, punctuation removed, articles and
number words kept — so scores are comparable between runs of this toolkit, not with papers that
tokenise with punctuation):
- `BLEU` — torchmetrics' BLEUScore on the normalised text: corpus BLEU-N (default 4) with brevity
  penalty (Papineni et al.), uniform weights, no smoothing: any empty n-gram order gives 0. Several
  references per prediction are allowed (a gold may be a list of strings; closest reference length is
  used for the brevity penalty).
- `RougeL` — sentence-level ROUGE-L F-measure (LCS; beta = 1, as rouge-score), averaged over samples.
  Ours rather than torchmetrics' ROUGEScore, which re-tokenises (splitting "2.5" into two words) and keeps
  every sample's score in a list state; this one keeps a float64 sum and scores our words.

The mean metrics keep float64 sums of their own (`_MeanScore`) rather than torchmetrics' MeanMetric, whose
float32 running mean drifts over thousands of samples and which would not reject an empty gold.

Pure per-sample helpers (`closed_hit`, `strict_closed_hit`, `token_recall`, `exact_match`,
`token_f1`, `rouge_l`, `corpus_bleu`, `llava_med_normalize`, `llava_med_f1`,
`llava_med_closed_outcome`) are exported for analysis notebooks.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.text import BLEUScore

from lightning_meddpo.text import ARTICLES, NUMBERS, normalize_answer, tokens

__all__ = [
    "normalize_answer", "tokens", "closed_hit", "strict_closed_hit", "token_recall", "exact_match",
    "token_f1", "lcs_length", "rouge_l", "corpus_bleu",
    "llava_med_normalize", "llava_med_f1", "llava_med_closed_outcome",
    "ClosedAccuracy", "StrictClosedAccuracy", "ClosedAccuracyRunEval", "OpenRecall", "ClippedOpenRecall", "ExactMatch",
    "TokenF1", "BLEU", "RougeL",
]

_ARTICLES, _NUMBERS = ARTICLES, NUMBERS  # LLaVA-Med's normalisation below shares them
_YES_NO = frozenset({"yes", "no"})


def _gold(gold: str, index: int | None = None, *, answer_mode: bool = True) -> str:
    g = normalize_answer(gold, answer_mode=answer_mode)
    if not g:
        where = f" at index {index}" if index is not None else ""
        raise ValueError(f"gold answer{where} is empty after normalisation: {gold!r}")
    return g


# ------------------------------------------------------------------ per-sample scores
def closed_hit(pred: str, gold: str, *, require_yes_no: bool = False) -> bool:
    """LLaVA-Med containment: normalised gold is a substring of the normalised prediction."""
    g, p = _gold(gold), normalize_answer(pred)
    if require_yes_no and "yes" not in p and "no" not in p:
        return False
    return g in p


def strict_closed_hit(pred: str, gold: str) -> bool:
    """Yes/no gold: the first yes/no token of the prediction decides. Otherwise normalised exact match."""
    g, p = _gold(gold), normalize_answer(pred)
    if g in _YES_NO:
        first = next((t for t in p.split() if t in _YES_NO), None)
        return first == g
    return p == g


def exact_match(pred: str, gold: str) -> bool:
    return normalize_answer(pred) == _gold(gold)


def _overlap(pred_toks: list[str], gold_toks: list[str]) -> int:
    return sum((Counter(pred_toks) & Counter(gold_toks)).values())


def token_recall(pred: str, gold: str) -> float:
    """Share of gold tokens found in the prediction (each gold token matched at most as often as it occurs)."""
    g = _gold(gold).split()
    return _overlap(tokens(pred), g) / len(g)


def token_f1(pred: str, gold: str) -> float:
    """SQuAD-style token F1 on normalised tokens; 0 for an empty prediction."""
    g, p = _gold(gold).split(), tokens(pred)
    common = _overlap(p, g)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, gold: str, beta: float = 1.0) -> float:
    """ROUGE-L F-measure: P = LCS/|pred|, R = LCS/|gold|, F = (1+b^2)PR/(R + b^2 P); 0 if either is empty."""
    p, g = tokens(pred, answer_mode=False), tokens(gold, answer_mode=False)
    if not p or not g:
        return 0.0
    lcs = lcs_length(p, g)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(g)
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def corpus_bleu(preds: Sequence[str], golds: Sequence[str | Sequence[str]], n_gram: int = 4) -> float:
    """Corpus BLEU of lists (the function form of `BLEU`)."""
    metric = BLEU(n_gram=n_gram)
    metric.update(list(preds), list(golds))
    return float(metric.compute())


# ------------------------------------------------------------------ torchmetrics wrappers
def _check_lists(preds: Sequence, golds: Sequence) -> tuple[list, list]:
    if isinstance(preds, str) or isinstance(golds, str):
        raise TypeError("preds and golds must be lists of strings, not single strings")
    preds, golds = list(preds), list(golds)
    if len(preds) != len(golds):
        raise ValueError(f"got {len(preds)} predictions but {len(golds)} gold answers")
    for i, p in enumerate(preds):
        if not isinstance(p, str):
            raise TypeError(f"preds[{i}] is {type(p).__name__}, expected str")
    return preds, golds


class _MeanScore(Metric):
    """Mean of a per-sample score: states `total` (sum of scores) and `count`, both summed across ranks."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    answer_mode = True  # normalisation used to reject empty golds

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def score(self, pred: str, gold: str) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, preds: Sequence[str], golds: Sequence[str]) -> None:
        preds, golds = _check_lists(preds, golds)
        s = 0.0
        for i, (p, g) in enumerate(zip(preds, golds)):
            if not isinstance(g, str):
                raise TypeError(f"golds[{i}] is {type(g).__name__}, expected str")
            _gold(g, i, answer_mode=self.answer_mode)
            s += float(self.score(p, g))
        self.total += s
        self.count += len(preds)

    def compute(self) -> torch.Tensor:
        if self.count == 0:
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.total.device)
        return self.total / self.count


class ClosedAccuracy(_MeanScore):
    """LLaVA-Med closed-question accuracy (containment; see module docstring)."""

    def __init__(self, require_yes_no: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.require_yes_no = require_yes_no

    def score(self, pred: str, gold: str) -> float:
        return float(closed_hit(pred, gold, require_yes_no=self.require_yes_no))


class StrictClosedAccuracy(_MeanScore):
    """Closed accuracy without containment quirks: first yes/no word decides, else exact match."""

    def score(self, pred: str, gold: str) -> float:
        return float(strict_closed_hit(pred, gold))


class ClippedOpenRecall(_MeanScore):
    """Our open-question recall: mean share of gold tokens present in the prediction, each gold token
    matched at most as often as it occurs (see `OpenRecall` for LLaVA-Med's, which does not clip)."""

    def score(self, pred: str, gold: str) -> float:
        return token_recall(pred, gold)


class OpenRecall(_MeanScore):
    """LLaVA-Med's open-question recall, exactly as its run_eval.py computes it (see module docstring)."""

    def score(self, pred: str, gold: str) -> float:
        return llava_med_f1(pred.lower(), gold.lower())[2]


class ClosedAccuracyRunEval(Metric):
    """LLaVA-Med run_eval.py's yes/no accuracy, denominator included (see module docstring): states are the
    hits and the questions run_eval counts, both summed across ranks."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("hits", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counted", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], golds: Sequence[str]) -> None:
        preds, golds = _check_lists(preds, golds)
        for i, (p, g) in enumerate(zip(preds, golds)):
            _gold(g, i)
            outcome = llava_med_closed_outcome(p, g)
            if outcome is not None:
                self.counted += 1
                self.hits += outcome

    def compute(self) -> torch.Tensor:
        if self.counted == 0:
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.hits.device)
        return self.hits / self.counted


# ------------------------------------------------------------------ LLaVA-Med's own scoring, reproduced
# microsoft/LLaVA-Med llava/eval/eval_metrics/glossary.py (normalize_word), utils.py (split_sentence) and
# evaluate_metrics.py (calculate_f1score), as run_eval.py calls them. Written from their behaviour, quirks kept.
_LLAVA_MED_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_LLAVA_MED_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: a lookahead for "<=digit", i.e. any period not before a digit
_LLAVA_MED_COMMA = re.compile(r"(\d)(\,)(\d)")
_LLAVA_MED_MAP = {"none": "0", **_NUMBERS}
_LLAVA_MED_CONTRACTIONS = {  # its glossary's table, whole (keys with capitals never match: it lower-cases first)
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've", 'couldnt': "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", 'didnt': "didn't", 'doesnt': "doesn't",
    'dont': "don't", 'hadnt': "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", 'hasnt': "hasn't",
    'havent': "haven't", 'hed': "he'd", "hed've": "he'd've", "he'dve": "he'd've", 'hes': "he's", 'howd': "how'd",
    'howll': "how'll", 'hows': "how's", "Id've": "I'd've", "I'dve": "I'd've", 'Im': "I'm", 'Ive': "I've",
    'isnt': "isn't", 'itd': "it'd", "itd've": "it'd've", "it'dve": "it'd've", 'itll': "it'll", "let's": "let's",
    'maam': "ma'am", 'mightnt': "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    'mightve': "might've", 'mustnt': "mustn't", 'mustve': "must've", 'neednt': "needn't", 'notve': "not've",
    'oclock': "o'clock", 'oughtnt': "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    'shant': "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", 'shouldve': "should've",
    'shouldnt': "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": 'somebodyd', "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    'somebodyll': "somebody'll", 'somebodys': "somebody's", 'someoned': "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", 'someonell': "someone'll", 'someones': "someone's", 'somethingd': "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", 'somethingll': "something'll",
    'thats': "that's", 'thered': "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    'therere': "there're", 'theres': "there's", 'theyd': "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    'theyll': "they'll", 'theyre': "they're", 'theyve': "they've", 'twas': "'twas", 'wasnt': "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", 'weve': "we've", 'werent': "weren't", 'whatll': "what'll",
    'whatre': "what're", 'whats': "what's", 'whatve': "what've", 'whens': "when's", 'whered': "where'd",
    'wheres': "where's", 'whereve': "where've", 'whod': "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    'wholl': "who'll", 'whos': "who's", 'whove': "who've", 'whyll': "why'll", 'whyre': "why're", 'whys': "why's",
    'wont': "won't", 'wouldve': "would've", 'wouldnt': "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", 'yall': "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", 'youd': "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", 'youll': "you'll", 'youre': "you're", 'youve': "you've",
}


def llava_med_normalize(text: str) -> str:
    """LLaVA-Med's `normalize_word`: punctuation dropped where it touches a space (or the text has a digit
    comma digit), else replaced by a space; periods not before a digit removed (at most 32 of them: the
    original passes re.UNICODE as the count); lower-cased; none/zero..ten -> digits; articles dropped;
    contractions restored; commas removed."""
    kept = text
    for p in _LLAVA_MED_PUNCT:
        if (p + " " in text or " " + p in text) or _LLAVA_MED_COMMA.search(text) is not None:
            kept = kept.replace(p, "")
        else:
            kept = kept.replace(p, " ")
    kept = _LLAVA_MED_PERIOD.sub("", kept, 32)
    words = [_LLAVA_MED_MAP.get(w, w) for w in kept.lower().split()]
    words = [_LLAVA_MED_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words).replace(",", "")


def llava_med_f1(pred: str, gold: str) -> tuple[float, float, float]:
    """(f1, precision, recall) of LLaVA-Med's `calculate_f1score`: word counts after `llava_med_normalize`;
    tp = the prediction's count of every word also in the gold (not clipped), fp = the prediction's other
    words, fn = the gold's words missing from the prediction; all zero when either side is empty or tp = 0."""
    p_words = Counter(llava_med_normalize(pred).split())
    g_words = Counter(llava_med_normalize(gold).split())
    if not p_words or not g_words:
        return 0.0, 0.0, 0.0
    tp = sum(n for w, n in p_words.items() if w in g_words)
    fp = sum(n for w, n in p_words.items() if w not in g_words)
    fn = sum(n for w, n in g_words.items() if w not in p_words)
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall), precision, recall


def llava_med_closed_outcome(pred: str, gold: str) -> int | None:
    """run_eval.py's closed-question rule: 1 (hit), 0 (a prediction without yes/no) or None (a prediction
    with yes/no that misses the gold: run_eval records nothing for it)."""
    p, g = llava_med_normalize(pred.lower()), llava_med_normalize(gold.lower())
    if "yes" in p or "no" in p:
        return 1 if g in p else None
    return 0


class ExactMatch(_MeanScore):
    def score(self, pred: str, gold: str) -> float:
        return float(exact_match(pred, gold))


class TokenF1(_MeanScore):
    def score(self, pred: str, gold: str) -> float:
        return token_f1(pred, gold)


class RougeL(_MeanScore):
    """Mean sentence-level ROUGE-L F-measure. An empty gold report is an error, not a zero."""

    answer_mode = False

    def __init__(self, beta: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.beta = beta

    def score(self, pred: str, gold: str) -> float:
        return rouge_l(pred, gold, self.beta)


class BLEU(BLEUScore):
    """Corpus BLEU-N with brevity penalty, uniform weights, no smoothing: torchmetrics' BLEUScore on our
    normalised text (`normalize_answer(..., answer_mode=False)`, which its 13a tokeniser leaves as it is),
    so reports are scored on the same words as every other metric here. Its states (clipped n-gram matches
    and totals, lengths) are summed across ranks: the corpus score is exact under DDP. An empty gold report
    is an error; with no samples the score is NaN (BLEUScore alone says 0)."""

    full_state_update = False  # its states are sums: a batch's update needs none of the others

    def __init__(self, n_gram: int = 4, **kwargs):
        if n_gram < 1:
            raise ValueError(f"n_gram must be >= 1, got {n_gram}")
        super().__init__(n_gram=n_gram, **kwargs)
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], golds: Sequence[str | Sequence[str]]) -> None:
        preds, golds = _check_lists(preds, golds)
        references = []
        for i, gold in enumerate(golds):
            refs = [gold] if isinstance(gold, str) else list(gold)
            if not refs:
                raise ValueError(f"golds[{i}]: at least one reference is needed")
            references.append([_gold(r, i, answer_mode=False) for r in refs])
        super().update([normalize_answer(p, answer_mode=False) for p in preds], references)
        self.count += len(preds)

    def compute(self) -> torch.Tensor:
        if self.count == 0:
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.count.device)
        return super().compute().to(torch.float64)
