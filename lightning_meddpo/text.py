"""Answer normalisation shared by the metrics (eval/metrics.py), the error analysis and the pair builder's
rewriter check: one definition, in the bottom layer, so data and eval both read it without importing each
other.

It follows LLaVA-Med's ``normalize_word`` in spirit: lower-case; apostrophes dropped ("patient's" ->
"patients"); thousands commas in numbers removed; a period is kept only between digits ("2.5"); every other
punctuation mark becomes a space; number words zero..ten become digits; the articles a/an/the are dropped;
whitespace collapsed. Unlike LLaVA-Med, "none" is not mapped to "0" (eval/metrics.py has LLaVA-Med's exact
normalisation too, for its recall).
"""

from __future__ import annotations

import re
import unicodedata

ARTICLES = frozenset({"a", "an", "the"})
NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_APOSTROPHES = re.compile(r"['\u2018\u2019`]")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_DECIMAL = re.compile(r"(?<=\d)\.(?=\d)")
_NON_WORD = re.compile(r"[^\w\s]|_")
_DOT_PLACEHOLDER = "\u2024"  # one-dot leader: protects decimal points while punctuation is removed


def normalize_answer(text: str, *, answer_mode: bool = True) -> str:
    """Canonical form of an answer (see module docstring). `normalize_answer("The LEFT lung.") == "left lung"`.

    ``answer_mode=False`` (used by the report metrics BLEU and ROUGE-L) keeps articles and number
    words: only case, apostrophes, punctuation and whitespace are normalised."""
    if not isinstance(text, str):
        raise TypeError(f"expected a string, got {type(text).__name__}: {text!r:.100}")
    s = unicodedata.normalize("NFKC", text).lower()
    s = _APOSTROPHES.sub("", s)
    s = _THOUSANDS.sub("", s)
    s = _DECIMAL.sub(_DOT_PLACEHOLDER, s)
    s = _NON_WORD.sub(lambda m: m.group() if m.group() == _DOT_PLACEHOLDER else " ", s)
    s = s.replace(_DOT_PLACEHOLDER, ".")
    if not answer_mode:
        return " ".join(s.split())
    words = [NUMBERS.get(w, w) for w in s.split()]
    return " ".join(w for w in words if w not in ARTICLES)


def tokens(text: str, *, answer_mode: bool = True) -> list[str]:
    """Word tokens of the normalised text (see `normalize_answer`)."""
    return normalize_answer(text, answer_mode=answer_mode).split()
