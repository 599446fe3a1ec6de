"""Preference-pair construction from VQA or caption files (issue 4; DESIGN.md §4 "targeted", §5).

Input (JSON array or JSONL), one of, per record:
  * LLaVA-Med question format: {question_id, image, text, answer | gpt4_answer, answer_type}
    ("answer" is used when present, else "gpt4_answer");
  * conversations: {id, image, conversations: [{from, value}, ...]}: the last gpt turn is the answer and
    every turn before it is the prompt;
  * captions / reports: {id | study_id (default: file stem and line), image | image_path | image_paths (a
    string or a list: the first image), caption | report}, with
    the prompt `CAPTION_PROMPT`.
Any of them may carry a lesion region, {"region": {"box": [x0, y0, x1, y1]}} (pixels) or
{"region": {"mask": "masks/x.png"}} (relative to the image root, non-zero = region), used by the
"region_noise" corruption (MMedPO); without one region_noise falls back to the centred half-size box.

Output (JSON array, or JSONL when out_path ends in .jsonl), the paper's format, one record per pair:
  text-rejected:  {"id": "<src>-text", "source_id", "image", "conversations", "rejected_conversations",
                   "pair_type": "text", "error_type": "laterality" | "anatomy" | ... | "rewriter"}
  image-rejected: {"id": "<src>-image", "source_id", "image", "rejected_image", "conversations",
                   "rejected_conversations" (== conversations), "pair_type": "image", "corruption": {...}}
`image` paths stay relative to the source image root, which is only read: corrupted images are written as
PNG under `rejected_image_root / rejected_image_dir / <corruption type>/`, where `rejected_image_root` is
the output file's folder unless given, and `rejected_image` is relative to it. Train on the output with
data.init_args.image_root (the source root) and data.init_args.rejected_image_root (printed at the end). The corruption provenance (type, full spec, seed,
resolved random draws) reproduces the image: `images.corrupt(load_image(image), c["spec"], c["seed"])`.

Text-rejected answers come from `perturb_answer` (the lexicon in lexicon.py: whole-word, case-preserving
swaps of visually grounded attributes) or from a `rewriter(question, answer)` hook (an LLM rewriter).
Answers that cannot be perturbed are skipped and counted by reason in the `BuildSummary`.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
from PIL import Image

from lightning_meddpo.data.images import corrupt, load_image, normalize_spec, seed_for
from lightning_meddpo.data.lexicon import ERROR_TYPES, LEXICON  # noqa: F401 (ERROR_TYPES re-exported)
from lightning_meddpo.data.records import (
    IMAGE_TOKEN, RecordError, Turn, canonical_role, default_id, load_json_records, valid_rows, with_image_placeholder,
)

CAPTION_PROMPT = "Describe the findings in this medical image."
Rng = np.random.Generator | random.Random
Rewriter = Callable[[str, str], "str | tuple[str, str]"]

# --------------------------------------------------------------------------------- lexicon perturbation


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
    tables = _tables(lexicon, error_types)
    return [name for name, t in tables.items() if _candidates(answer, t)]


def _tables(lexicon: dict[str, Any] | None, error_types: Iterable[str] | None) -> dict[str, _Table]:
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
    options = [(name, c) for name, t in _tables(lexicon, error_types).items() if (c := _candidates(answer, t))]
    if not options:
        return None
    name, cands = options[_pick(rng, len(options))]
    return cands[_pick(rng, len(cands))], name


# ------------------------------------------------------------------------------------------- input side


@dataclass
class SourceItem:
    """One question/answer (or caption) with its image, before a pair is made from it."""

    id: str
    source: str
    image: str  # relative to the image root, POSIX separators
    prompt: list[dict[str, str]]  # turns before the answer, with exactly one <image> placeholder
    answer: str
    placeholder_inserted: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def question(self) -> str:
        humans = [t["value"] for t in self.prompt if t["from"] == "human"]
        return humans[-1].replace(IMAGE_TOKEN, "").strip() if humans else ""


def safe_relative_path(value: Any, source: str, record_id: str | None, field_name: str) -> str:
    """A relative POSIX path that cannot escape the image root (no absolute paths, no '..')."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str) or not value.strip():
        raise RecordError(source, record_id, field_name, f"expected one image path, got {value!r}")
    p = PurePosixPath(value.replace("\\", "/"))
    if p.is_absolute() or re.match(r"^[A-Za-z]:", value) or ".." in p.parts:
        raise RecordError(source, record_id, field_name, f"image path {value!r} escapes the image root "
                          "(absolute paths and '..' are not allowed)")
    return str(p)


def _parse_region(region: Any, source: str, rid: str) -> dict[str, Any]:
    """A record's lesion region for region_noise: {"box": [x0, y0, x1, y1]} (pixels) or {"mask": "rel.png"}."""
    if isinstance(region, dict) and set(region) == {"box"}:
        box = region["box"]
        if (isinstance(box, list) and len(box) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            return {"box": box}
    elif isinstance(region, dict) and set(region) == {"mask"}:
        return {"mask": safe_relative_path(region["mask"], source, rid, "region.mask")}
    raise RecordError(source, rid, "region", f"expected {{'box': [x0, y0, x1, y1]}} or {{'mask': 'path'}}, "
                      f"got {region!r}")


def parse_source_record(raw: Any, source: str) -> SourceItem:
    """One input record (question, conversations or caption format) -> SourceItem; problems raise RecordError."""
    if not isinstance(raw, dict):
        raise RecordError(source, None, "<record>", f"expected a JSON object, got {type(raw).__name__}")
    rid_field = next((k for k in ("question_id", "id", "study_id") if raw.get(k) is not None), "id")
    rid = raw.get(rid_field)
    if (rid is None or str(rid).strip() == "") and ("caption" in raw or "report" in raw):
        rid = default_id(source)  # the released AMBOSS train file has no ids: file stem and line
    if rid is None or str(rid).strip() == "":
        raise RecordError(source, None, rid_field, "missing record id (question_id, id or study_id)")
    rid = str(rid)
    img_field = next((k for k in ("image", "image_path", "image_paths") if k in raw), None)
    if img_field is None:
        raise RecordError(source, rid, "image", "missing (expected image, image_path or image_paths)")
    value = raw[img_field]
    if isinstance(value, list) and len(value) > 1:
        value = value[:1]  # one image per pair: the first (MIMIC-CXR studies list several views)
    image = safe_relative_path(value, source, rid, img_field)
    if "conversations" in raw:
        conv = raw["conversations"]
        if not isinstance(conv, list) or not conv:
            raise RecordError(source, rid, "conversations", "expected a non-empty list of turns")
        turns = []
        for i, t in enumerate(conv):
            if not isinstance(t, dict) or not isinstance(t.get("value"), str) or "from" not in t:
                raise RecordError(source, rid, f"conversations[{i}]", "expected {'from': ..., 'value': str}")
            role = canonical_role(t["from"])
            if role is None:
                raise RecordError(source, rid, f"conversations[{i}].from", f"unknown role {t['from']!r}")
            turns.append({"from": role, "value": t["value"]})
        last = max((i for i, t in enumerate(turns) if t["from"] == "gpt"), default=None)
        if last is None:
            raise RecordError(source, rid, "conversations", "no gpt turn (the answer)")
        if not any(t["from"] == "human" for t in turns[:last]):
            raise RecordError(source, rid, "conversations", "no human turn before the answer")
        if last != len(turns) - 1:
            raise RecordError(source, rid, f"conversations[{last + 1}]", "turns after the last gpt turn (the answer)")
        prompt, answer = turns[:last], turns[last]["value"]
        answer_field, extra = f"conversations[{last}].value", {}
    elif "text" in raw:
        key = "answer" if "answer" in raw else "gpt4_answer" if "gpt4_answer" in raw else None
        if key is None:
            raise RecordError(source, rid, "answer", "missing (expected 'answer' or 'gpt4_answer')")
        answer, answer_field = raw[key], key
        if not isinstance(raw["text"], str):
            raise RecordError(source, rid, "text", "expected the question as a string")
        prompt = [{"from": "human", "value": raw["text"]}]
        extra = {k: raw[k] for k in ("answer_type",) if k in raw}
    elif "caption" in raw or "report" in raw:
        key = "caption" if "caption" in raw else "report"
        answer, answer_field = raw[key], key
        prompt = [{"from": "human", "value": CAPTION_PROMPT}]
        extra = {}
    else:
        raise RecordError(source, rid, "<record>", "expected 'conversations', a question ('text' with 'answer' "
                          "or 'gpt4_answer') or a 'caption'/'report'")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise RecordError(source, rid, answer_field, f"expected a string, got {type(answer).__name__}")
    if "region" in raw:
        extra["region"] = _parse_region(raw["region"], source, rid)
    try:
        placed, inserted = with_image_placeholder([Turn(t["from"], t["value"]) for t in prompt])
        prompt = [{"from": t.role, "value": t.text} for t in placed]
    except ValueError as e:
        raise RecordError(source, rid, "conversations", str(e)) from e
    return SourceItem(rid, source, image, prompt, answer, inserted, extra)


# ------------------------------------------------------------------------------------------ output side


@dataclass
class BuildSummary:
    """What build_pairs did: records read, pairs written by type, skips by reason (with example ids)."""

    out_path: str = ""
    image_root: str = ""
    rejected_image_root: str = ""
    read: int = 0
    written: Counter = field(default_factory=Counter)  # pair_type -> n
    error_types: Counter = field(default_factory=Counter)  # error_type -> n (text pairs)
    skipped: Counter = field(default_factory=Counter)  # reason -> n
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few record ids
    placeholder_inserted: int = 0

    @property
    def total_written(self) -> int:
        return sum(self.written.values())

    def skip(self, reason: str, record_id: str) -> None:
        self.skipped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 3:
            ex.append(record_id)

    def summary(self) -> str:
        lines = [f"{self.read} source records read; {self.total_written} pairs written to {self.out_path}"]
        for kind, n in sorted(self.written.items()):
            lines.append(f"  {kind}-rejected pairs: {n}")
        for et, n in sorted(self.error_types.items()):
            lines.append(f"    error_type {et}: {n}")
        if self.placeholder_inserted:
            lines.append(f"  {self.placeholder_inserted} prompts had no {IMAGE_TOKEN} placeholder (inserted)")
        for reason, n in sorted(self.skipped.items()):
            lines.append(f"  skipped {n}: {reason} (e.g. {', '.join(self.examples.get(reason, []))})")
        if self.total_written:
            lines.append(f"  train on it with --data.init_args.train_file={self.out_path} "
                         f"--data.init_args.image_root={self.image_root}"
                         + (f" --data.init_args.rejected_image_root={self.rejected_image_root}" if self.written.get("image") else ""))
        return "\n".join(lines)


def _safe_stem(record_id: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", record_id).strip("._")[:80] or "record"
    return f"{stem}_{seed_for(record_id, 0, 0) % 16**8:08x}"  # the hash keeps sanitised ids distinct


def _conversation(prompt: list[dict[str, str]], answer: str) -> list[dict[str, str]]:
    return [dict(t) for t in prompt] + [{"from": "gpt", "value": answer}]


def _write_records(records: list[dict[str, Any]], out_path: Path) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        if out_path.suffix == ".jsonl":
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        else:
            json.dump(records, f, ensure_ascii=False, indent=1)
            f.write("\n")
    os.replace(tmp, out_path)


def build_pairs(
    input_path: str | Path,
    image_root: str | Path,
    out_path: str | Path,
    *,
    mode: Literal["text", "image", "both"] = "both",
    corruption: str | dict[str, Any] = "crop",
    error_types: Iterable[str] | None = None,
    seed: int = 0,
    rewriter: Rewriter | None = None,
    progress: bool = True,
    rejected_image_dir: str = "rejected_images",
    skip_invalid: bool = False,
    lexicon: dict[str, Any] | None = None,
    rejected_image_root: str | Path | None = None,
) -> BuildSummary:
    """Build text- and/or image-rejected preference pairs from a VQA/caption file (see the module docstring).

    mode: "text" (lexicon or `rewriter` perturbation of the answer), "image" (`corruption` of the image,
    written as PNG under rejected_image_root/rejected_image_dir/<type>/; rejected_image_root defaults to the
    output's folder, never the source image root), or "both" (one of each per source record).
    error_types: subset of lexicon.ERROR_TYPES (None: all). rewriter(question, answer) -> rejected answer
    (or (rejected, error_type)) replaces the lexicon builder when given. Seeds are per record:
    seed_for(f"text:{id}" or id, 0, seed), so a record's pair does not depend on its position in the file.
    Malformed records and paths escaping the image root raise RecordError unless skip_invalid (then they
    are counted). Missing images and unperturbable answers are skipped and counted by reason.
    """
    from tqdm.auto import tqdm

    if mode not in ("text", "image", "both"):
        raise ValueError(f"mode must be 'text', 'image' or 'both', got {mode!r}")
    image_root, out_path = Path(image_root), Path(out_path)
    rejected_root = Path(rejected_image_root) if rejected_image_root is not None else out_path.parent
    if out_path.resolve() == Path(input_path).resolve():
        raise ValueError(f"out_path {out_path} is the input file; write the pairs to another file")
    spec = normalize_spec(corruption) if mode in ("image", "both") else None
    rel_dir = safe_relative_path(rejected_image_dir, "build_pairs", None, "rejected_image_dir")
    error_types = list(error_types) if error_types is not None else None
    _tables(lexicon, error_types)  # validate the names up front
    summary = BuildSummary(out_path=str(out_path), image_root=str(image_root), rejected_image_root=str(rejected_root))
    out: list[dict[str, Any]] = []
    raws = load_json_records(Path(input_path))

    def skip(e: RecordError) -> None:
        summary.skip(f"invalid record: field {e.field_name}", e.record_id or e.source)

    items = valid_rows(raws, lambda raw, source, i: parse_source_record(raw, source), skip, skip_invalid)
    for item in tqdm(items, total=len(raws), desc="build pairs", unit="record", disable=not progress):
        summary.read += 1
        summary.placeholder_inserted += item.placeholder_inserted
        if not item.answer.strip():
            summary.skip("empty answer", item.id)
            continue
        image_path = image_root / item.image
        if not image_path.is_file():
            summary.skip("image file not found", item.id)
            continue
        img = None
        if mode in ("image", "both"):  # decode first: an undecodable image gives no pair of either kind
            try:
                img = load_image(image_path, record_id=item.id)
            except ValueError:
                summary.skip("image file cannot be decoded", item.id)
                continue
        chosen = _conversation(item.prompt, item.answer)
        base = {"source_id": item.id, "image": item.image, **item.extra}
        if mode in ("text", "both"):
            rec = _text_pair(item, chosen, base, error_types, seed, rewriter, lexicon, summary)
            if rec is not None:
                out.append(rec)
        if mode in ("image", "both"):
            rec = _image_pair(item, chosen, base, img, image_root, rejected_root, rel_dir, spec, seed, summary)
            if rec is not None:
                out.append(rec)
    _write_records(out, out_path)
    return summary


def _text_pair(item, chosen, base, error_types, seed, rewriter, lexicon, summary) -> dict[str, Any] | None:
    if rewriter is not None:
        try:
            result = rewriter(item.question, item.answer)
        except Exception as e:
            rw = sys.modules.get("lightning_meddpo.commands.rewriter")  # not imported: cannot be its RewriteError
            if rw is not None and isinstance(e, rw.RewriteError):  # the LLM answered, never usably: skip this one
                summary.skip("text: rewriter gave no rewrite that differs from the answer", item.id)
                return None
            raise RuntimeError(f"{item.source} id={item.id!r}: the rewriter failed: {e}") from e
        rejected, error_type = result if isinstance(result, tuple) else (result, "rewriter")
        if not isinstance(rejected, str) or not rejected.strip():
            summary.skip("text: rewriter returned an empty answer", item.id)
            return None
        if rejected.strip() == item.answer.strip():
            summary.skip("text: rewriter returned the answer unchanged", item.id)
            return None
    else:
        rng = np.random.default_rng(seed_for(f"text:{item.id}", 0, seed))
        res = perturb_answer(item.answer, rng, error_types, lexicon)
        if res is None:
            summary.skip("text: no lexicon term of the requested error types in the answer", item.id)
            return None
        rejected, error_type = res
    summary.written["text"] += 1
    summary.error_types[error_type] += 1
    return {"id": f"{item.id}-text", **base, "conversations": chosen,
            "rejected_conversations": _conversation(item.prompt, rejected),
            "pair_type": "text", "error_type": error_type}


def _image_pair(item, chosen, base, img, image_root, rejected_root, rel_dir, spec, seed, summary) -> dict[str, Any] | None:
    region = item.extra.get("region")
    mask_file = None
    if spec["type"] == "region_noise" and region is not None:
        if "box" in region:
            spec = {**spec, "box": region["box"], "mask": None}
        else:
            mask_file = region["mask"]
            try:
                with Image.open(image_root / mask_file) as mim:
                    mask = np.asarray(mim.convert("L")) > 0
            except OSError as e:
                summary.skip(f"image: cannot load the region mask ({type(e).__name__})", item.id)
                return None
            spec = {**spec, "box": None, "mask": mask}
    try:
        bad, prov = corrupt(img, spec, seed_for(item.id, 0, seed))
    except ValueError as e:  # e.g. a box outside the image, a mask of the wrong size
        raise RecordError(item.source, item.id, "region", str(e)) from e
    if mask_file is not None:
        prov["spec"]["mask"]["file"] = mask_file  # reproduce(image, prov, mask=<that file loaded, > 0>)
    rel = f"{rel_dir}/{prov['type']}/{_safe_stem(item.id)}.png"
    dest = rejected_root / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    bad.save(dest, format="PNG")
    summary.written["image"] += 1
    return {"id": f"{item.id}-image", **base, "rejected_image": rel, "conversations": chosen,
            "rejected_conversations": [dict(t) for t in chosen], "pair_type": "image", "corruption": prov}


# --------------------------------------------------------------------------------------------------- CLI


def _parse_corruption(value: str) -> str | dict[str, Any]:
    """A corruption name ("crop") or a JSON spec ('{"type": "diffusion", "t": 500}'), checked now."""
    spec: str | dict[str, Any] = value
    if value.lstrip().startswith("{"):
        try:
            spec = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"--corruption: not valid JSON: {e}") from e
    normalize_spec(spec)  # unknown names / parameters fail here, before any work
    return spec


def _parse_error_types(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    _tables(None, names)  # unknown names fail here
    return names


def make_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m lightning_meddpo build-pairs",
        description="Build text- and/or image-rejected preference pairs (the paper's format) from a VQA, "
                    "conversation or caption file (JSON array or JSONL).",
    )
    p.add_argument("--input", required=True, help="source records: LLaVA-Med questions, conversations or captions")
    p.add_argument("--image-root", default=None,
                   help="directory image paths are relative to, only read (default: the input file's directory)")
    p.add_argument("--out", required=True, help="output file (.json array, or .jsonl)")
    p.add_argument("--mode", choices=("text", "image", "both"), default="both",
                   help="text-rejected pairs, image-rejected pairs, or one of each per record (default: both)")
    p.add_argument("--corruption", default="crop",
                   help='image corruption: a name (crop, diffusion, region_noise, black, rotate) or a JSON spec, '
                        'e.g. \'{"type": "diffusion", "t": 500}\' (default: crop)')
    p.add_argument("--error-types", nargs="+", default=None, metavar="TYPE",
                   help=f"lexicon error types to inject (space or comma separated; default: all of {list(ERROR_TYPES)})")
    p.add_argument("--seed", type=int, default=0, help="base seed; each record's draws derive from it and its id")
    p.add_argument("--skip-invalid", action="store_true",
                   help="count and report malformed records instead of stopping at the first")
    p.add_argument("--rejected-image-root", default=None,
                   help="where corrupted images are written (default: the --out file's folder; never the source "
                        "image root unless you name it here)")
    p.add_argument("--rejected-image-dir", default="rejected_images",
                   help="folder under the rejected image root for corrupted images (default: rejected_images)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("LLM rewriter (text pairs from an OpenAI-compatible model instead of the lexicon)")
    g.add_argument("--rewriter-url", default=None, help="API base, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--rewriter-model", default="gpt-4o", help="model name (default: gpt-4o)")
    g.add_argument("--rewriter-api-key-env", default="OPENAI_API_KEY",
                   help="NAME of the environment variable holding the API key (default: OPENAI_API_KEY; "
                        "unset is fine for local servers)")
    g.add_argument("--rewriter-cache-dir", default=None, help="reply cache: a rerun sends no request")
    g.add_argument("--rewriter-max-attempts", type=int, default=3,
                   help="requests per answer before giving up on it (default: 3)")
    return p


def main(argv: Sequence[str] | None = None) -> BuildSummary:
    """`python -m lightning_meddpo build-pairs ...`: prints what was written and skipped, and why."""
    parser = make_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    rewriter_flags = [f for f in ("rewriter_model", "rewriter_cache_dir") if getattr(args, f) != parser.get_default(f)]
    if args.rewriter_url is None and rewriter_flags:
        parser.error(f"--{rewriter_flags[0].replace('_', '-')} needs --rewriter-url")
    if args.rewriter_url is not None and args.mode == "image":
        parser.error("--rewriter-url makes text pairs; it has no effect with --mode image")
    try:
        corruption = _parse_corruption(args.corruption)
        error_types = _parse_error_types(args.error_types)
    except ValueError as e:
        parser.error(str(e))
    if args.rewriter_url is not None and error_types is not None:
        parser.error("--error-types selects lexicon perturbations; the LLM rewriter (--rewriter-url) replaces them")
    input_path = Path(args.input)
    if not input_path.is_file():
        parser.error(f"--input {input_path}: no such file")
    image_root = Path(args.image_root) if args.image_root is not None else input_path.parent
    if not image_root.is_dir():
        parser.error(f"--image-root {image_root}: no such directory")

    rewriter = client = None
    if args.rewriter_url is not None:
        from lightning_meddpo.commands.rewriter import LLMRewriter
        from lightning_meddpo.llm import LLMClient

        client = LLMClient(args.rewriter_url, args.rewriter_model, api_key_env=args.rewriter_api_key_env,
                           cache_dir=args.rewriter_cache_dir)
        rewriter = LLMRewriter(client, max_attempts=args.rewriter_max_attempts)
    try:
        summary = build_pairs(
            input_path, image_root, args.out, mode=args.mode, corruption=corruption, error_types=error_types,
            seed=args.seed, rewriter=rewriter, progress=not args.no_progress,
            rejected_image_dir=args.rejected_image_dir, skip_invalid=args.skip_invalid,
            rejected_image_root=args.rejected_image_root,
        )
    except (RecordError, ValueError, RuntimeError, OSError) as e:
        hint = "" if args.skip_invalid or not isinstance(e, RecordError) else " (--skip-invalid counts such records and goes on)"
        print(f"build-pairs: error: {e}{hint}", file=sys.stderr)
        raise SystemExit(1) from None
    print(summary.summary())
    if client is not None:
        st = client.stats
        print(f"  rewriter {client.model} at {client.url}: {st['requests']} requests, {st['cache_hits']} cache hits")
    return summary
