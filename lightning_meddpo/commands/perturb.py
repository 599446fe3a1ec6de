"""Targeted visual-misinterpretation errors injected into an answer (docs/design.md §4 "targeted"): whole-word,
case-preserving swaps of the attributes an image decides (side, anatomy, modality, presence, size, count)
from the lexicon in data/lexicon.py, with a/an and numbers kept grammatical. `perturb_answer` is what
build-pairs calls for each text-rejected pair."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from lightning_meddpo.data.lexicon import LEXICON

Rng = np.random.Generator | random.Random


def _pick(rng: Rng, n: int) -> int:
    return int(rng.integers(n)) if isinstance(rng, np.random.Generator) else rng.randrange(n)


def _term_pattern(term: str) -> str:
    return r"\s+".join(re.escape(w) for w in term.split())


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


@dataclass(frozen=True)
class _Table:
    """One error type compiled: lower-cased source term -> (canonical source, candidate targets)."""

    terms: dict[str, tuple[str, tuple[str, ...]]]
    regex: re.Pattern | None
    start: dict[str, tuple[str, tuple[str, ...]]]
    start_regex: re.Pattern | None
    mirror: bool
    numbers: bool


def _compile(entry: dict[str, Any]) -> _Table:
    terms: dict[str, tuple[str, list[str]]] = {}

    def add(src: str, tgt: str, table: dict) -> None:
        canon, targets = table.setdefault(_norm(src), (src, []))
        if _norm(tgt) != _norm(src) and tgt not in targets:
            targets.append(tgt)

    for a, b in entry.get("swaps", []):
        add(a, b, terms)
        add(b, a, terms)
    for a, b in entry.get("rules", []):
        add(a, b, terms)
    for group in entry.get("groups", []):
        for a in group:
            for b in group:
                add(a, b, terms)
    start: dict[str, tuple[str, list[str]]] = {}
    for a, b in entry.get("start_only", []):
        add(a, b, start)

    def regex(table: dict, anchored: bool) -> re.Pattern | None:
        if not table:
            return None
        alts = "|".join(_term_pattern(c) for c, _ in sorted(table.values(), key=lambda v: -len(v[0])))
        if anchored:  # a whole leading word followed by punctuation or the end: "No.", "Yes, ..."
            return re.compile(f"^\\s*({alts})(?=\\s*(?:[.,;:!]|$))", re.IGNORECASE)
        return re.compile(f"(?<![\\w-])({alts})(?![\\w-])", re.IGNORECASE)

    freeze = lambda t: {k: (c, tuple(v)) for k, (c, v) in t.items()}  # noqa: E731
    return _Table(freeze(terms), regex(terms, False), freeze(start), regex(start, True),
                  bool(entry.get("mirror")), bool(entry.get("numbers")))


@lru_cache(maxsize=8)
def _compiled(lexicon_json: str) -> dict[str, _Table]:
    return {name: _compile(entry) for name, entry in json.loads(lexicon_json).items()}


_VOWEL_LETTER_ACRONYM = set("AEFHILMNORSX")  # letters whose name starts with a vowel sound: "an MRI", "an X-ray"


def _wants_an(word: str) -> bool:
    if not word:
        return False
    if word[0].isupper() and (len(word) == 1 or not word[1].islower()):  # acronym: CT, MRI, X-ray
        return word[0] in _VOWEL_LETTER_ACRONYM
    w = word.lower()
    if w.startswith(("uni", "use", "usu", "one", "eu")):
        return False
    return w[0] in "aeiou"


def _match_case(matched: str, canonical: str, target: str) -> str:
    """Carry the case of the matched text over to the target (acronyms in the lexicon keep their case)."""
    if matched.isupper() and len(matched) > 1 and not canonical.isupper():
        return target.upper()
    if matched[:1].isupper() and not canonical[:1].isupper():
        return target[:1].upper() + target[1:]
    return target


_SENTENCE_START = re.compile(r"(^|[.!?:;]\s+|\n\s*)$")
_ARTICLE = re.compile(r"(?<![\w-])(a|an)(\s+)$", re.IGNORECASE)


def _apply(text: str, edits: Sequence[tuple[int, int, str, str]]) -> str:
    """Replace spans (start, end, canonical source, target), matching case and fixing a/an before them."""
    out = ""
    pos = 0
    for start, end, canonical, target in sorted(edits):
        out += text[pos:start]
        rep = _match_case(text[start:end], canonical, target)
        if _SENTENCE_START.search(out) and rep[:1].islower() and text[start:start + 1].isupper():
            rep = rep[:1].upper() + rep[1:]
        m = _ARTICLE.search(out)
        if m and rep:
            art = "an" if _wants_an(rep.split()[0]) else "a"
            if m.group(1)[0].isupper():
                art = art.capitalize()
            out = out[: m.start(1)] + art + m.group(2)
        out += rep
        pos = end
    return out + text[pos:]


_NUMBER = re.compile(r"(?<![\w.\-])(\d+(?:\.\d+)?)(?!\.?\d)(?!(?:st|nd|rd|th)\b)")


def _number_variants(s: str) -> list[str]:
    if "." in s:
        d = len(s.split(".")[1])
        x = float(s)
        vals = [f"{x * 2:.{d}f}", f"{x / 2:.{d}f}"]
    else:
        n = int(s)
        vals = [str(n + 1), str(n * 2)] + ([str(n - 1)] if n >= 2 else [])
    out = []
    for v in vals:
        if v != s and float(v) != float(s) and v not in out:
            out.append(v)
    return out


def _candidates(answer: str, table: _Table) -> list[str]:
    """Every distinct rejected answer this error type can make from `answer` (none equal to it)."""
    cands: list[str] = []
    matches = list(table.regex.finditer(answer)) if table.regex else []
    present = {_norm(m.group(1)) for m in matches}
    if table.mirror and matches:
        edits = []
        for m in matches:
            canon, targets = table.terms[_norm(m.group(1))]
            edits.append((m.start(1), m.end(1), canon, targets[0]))
        cands.append(_apply(answer, edits))
    elif matches:
        by_term: dict[str, list[re.Match]] = {}
        for m in matches:
            by_term.setdefault(_norm(m.group(1)), []).append(m)
        for key, ms in by_term.items():
            canon, targets = table.terms[key]
            for tgt in targets:
                if _norm(tgt) in present:  # do not turn "liver and kidney" into "kidney and kidney"
                    continue
                cands.append(_apply(answer, [(m.start(1), m.end(1), canon, tgt) for m in ms]))
    if table.start_regex:
        m = table.start_regex.search(answer)
        if m:
            canon, targets = table.start[_norm(m.group(1))]
            cands.extend(_apply(answer, [(m.start(1), m.end(1), canon, t)]) for t in targets)
    if table.numbers:
        for m in list(_NUMBER.finditer(answer))[:8]:
            for v in _number_variants(m.group(1)):
                cands.append(answer[: m.start(1)] + v + answer[m.end(1):])
    seen, out = set(), []
    for c in cands:
        if c.strip() != answer.strip() and c not in seen:
            seen.add(c)
            out.append(c)
    return out


def applicable_error_types(
    answer: str, error_types: Iterable[str] | None = None, lexicon: dict[str, Any] | None = None
) -> list[str]:
    """The error types (in lexicon order) that can perturb this answer."""
    tables = lexicon_tables(lexicon, error_types)
    return [name for name, t in tables.items() if _candidates(answer, t)]


def lexicon_tables(lexicon: dict[str, Any] | None, error_types: Iterable[str] | None) -> dict[str, _Table]:
    all_tables = _compiled(json.dumps(lexicon if lexicon is not None else LEXICON, sort_keys=True))
    if error_types is None:
        return all_tables
    wanted = list(error_types)
    unknown = [e for e in wanted if e not in all_tables]
    if unknown:
        raise ValueError(f"unknown error type(s) {unknown}; known: {list(all_tables)}")
    return {name: all_tables[name] for name in all_tables if name in wanted}


def perturb_answer(
    answer: str, rng: Rng, error_types: Iterable[str] | None = None, lexicon: dict[str, Any] | None = None
) -> tuple[str, str] | None:
    """Inject one visual-misinterpretation error: (rejected, error_type), or None if no type applies.

    The error type is drawn uniformly (with `rng`, a numpy Generator or random.Random) among the
    applicable ones in `error_types` (None: all of `lexicon.ERROR_TYPES`), then one concrete edit of that
    type. The rejected answer never equals the chosen one.
    """
    if not isinstance(answer, str) or not answer.strip():
        return None
    options = [(name, c) for name, t in lexicon_tables(lexicon, error_types).items() if (c := _candidates(answer, t))]
    if not options:
        return None
    name, cands = options[_pick(rng, len(options))]
    return cands[_pick(rng, len(cands))], name
