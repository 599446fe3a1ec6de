"""Preference records: parsing and validation of the paper's released format (docs/design.md §5).

A record becomes a `PreferenceRecord`; every problem is a `RecordError` naming the file, the line or
index, the record id and the field. Nothing is dropped or changed silently: records missing the
`<image>` placeholder get one inserted and are counted in the `ReadReport`.

Other input formats (TRL conversational preference rows, `datasets` datasets) live in formats.py and
map to the same `PreferenceRecord`; there `image` may be a PIL image (a `datasets` Image feature)
instead of a path.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    from PIL import Image

T = TypeVar("T")
IMAGE_TOKEN = "<image>"
HUMAN_ROLES = {"human", "user"}
GPT_ROLES = {"gpt", "assistant"}


class RecordError(ValueError):
    """A record that cannot be used, with where it came from and which field is wrong."""

    def __init__(self, source: str, record_id: str | None, field_name: str, problem: str, *, reason: str | None = None):
        self.source, self.record_id, self.field_name, self.problem = source, record_id, field_name, problem
        self._reason = reason
        rid = f" id={record_id!r}" if record_id is not None else ""
        super().__init__(f"{source}{rid}: field {field_name!r}: {problem}")

    @property
    def reason(self) -> str:
        """A short, value-free reason for skip counts, e.g. "field image: image file not found"."""
        if self._reason is None:
            problem = self.problem.split(":")[0].split(", got ")[0]
            field_name = self.field_name.split("[")[0].split(".")[0]
            return f"field {field_name}: {problem}"
        return self._reason


@dataclass(frozen=True)
class Turn:
    role: Literal["human", "gpt"]
    text: str


@dataclass(frozen=True)
class PreferenceRecord:
    """One preference pair. `prompt` holds every turn before the final response.

    An unpaired (KTO) record has `desirable` set: `chosen` holds its one completion, `rejected` is "".
    """

    id: str
    image: Path | Image.Image  # an absolute path inside the image root, or an image from a `datasets` dataset
    prompt: tuple[Turn, ...]
    chosen: str
    rejected: str
    rejected_image: Path | Image.Image | None = None
    weighted_score: float | None = None
    pair_type: Literal["text", "image"] = "text"
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    desirable: bool | None = None


@dataclass
class ReadReport:
    """What reading a file did: counts by outcome, so nothing happens unseen."""

    read: int = 0
    placeholder_inserted: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count (only in skip mode)
    errors: list[str] = field(default_factory=list)

    def skip(self, err: RecordError) -> None:
        """Count a skipped record under its reason and keep its full message."""
        self.skipped[err.reason] += 1
        self.errors.append(str(err))

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        parts = [f"{self.read} records read"]
        if self.placeholder_inserted:
            parts.append(f"{self.placeholder_inserted} had no {IMAGE_TOKEN} placeholder (inserted)")
        for reason, n in sorted(self.skipped.items()):
            parts.append(f"{n} skipped: {reason}")
        return "; ".join(parts)


def read_text(path: Path) -> str:
    """A data file as text: UTF-8, a leading byte order mark ignored; anything else is a RecordError
    naming the file and the first offending byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise RecordError(f"{path}:{line}", None, "<file>", f"not UTF-8 text: byte 0x{raw[e.start]:02x} at offset "
                          f"{e.start} (save the file as UTF-8)") from None


def load_json_records(path: Path) -> list[tuple[str, Any]]:
    """Raw records of a JSON array or JSONL file, each with a source label 'file:line' or 'file[i]'."""
    text = read_text(path)
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        out = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                out.append((f"{path}:{lineno}", RecordError(f"{path}:{lineno}", None, "<line>", f"malformed JSON: {e}")))
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(str(path), None, "<file>", f"malformed JSON: {e}") from e
    if not isinstance(data, list):
        raise RecordError(str(path), None, "<file>", "expected a JSON array of records or JSONL")
    return [(f"{path}[{i}]", rec) for i, rec in enumerate(data)]


@dataclass(frozen=True)
class ImageRoots:
    """Where a record's image paths are resolved: `image` under `images`, `rejected_image` under `rejected`
    (default: the same root). build-pairs writes the corrupted images beside its output, never into the
    source image folder, so its pairs are read with two roots."""

    images: Path
    rejected: Path | None = None

    def for_field(self, field_name: str) -> Path:
        return self.rejected if field_name.startswith("rejected_image") and self.rejected is not None else self.images


def relative_image_path(value: Any, source: str, record_id: str | None, field_name: str) -> str:
    """The one image-path rule of every reader: a relative POSIX path (backslashes read as separators) that cannot
    leave the image root: no absolute path, no drive letter, no '..'."""
    if not isinstance(value, str) or not value.strip():
        raise RecordError(source, record_id, field_name, f"expected an image path, got {value!r}")
    rel = PurePosixPath(value.replace("\\", "/"))
    if rel.is_absolute() or re.match(r"^[A-Za-z]:", value) or ".." in rel.parts:
        raise RecordError(source, record_id, field_name, f"image path {value!r} escapes the image root "
                          "(absolute paths and '..' are not allowed)",
                          reason=f"field {field_name}: image path escapes the image root")
    return str(rel)


def resolve_image(image_root: Path | ImageRoots, value: Any, source: str, record_id: str, field_name: str) -> Path:
    """An image path inside the image root that exists (`relative_image_path`'s rule); anything else is a
    RecordError. The root is the boundary after symbolic links are followed too: a link inside it pointing
    elsewhere is refused."""
    root = image_root.for_field(field_name) if isinstance(image_root, ImageRoots) else Path(image_root)
    rel = relative_image_path(value, source, record_id, field_name)
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise RecordError(source, record_id, field_name, f"image path {value!r} resolves to {path}, outside the image "
                          f"root {root.resolve()} (through a symbolic link): set the image root to where the images are",
                          reason=f"field {field_name}: image path escapes the image root")
    if not path.is_file():
        raise RecordError(source, record_id, field_name, f"image file not found: {path}")
    return path


def default_id(source: str) -> str:
    """`<file stem>:<line>` (JSONL) or `<file stem>:<index>` (JSON array): the id of a record without one
    (the released AMBOSS files have none), from its source label (see `load_json_records`)."""
    file, _, where = source.rpartition(":") if not source.endswith("]") else source[:-1].rpartition("[")
    return f"{PurePosixPath(file).stem}:{where}"


def canonical_role(value: object) -> Literal["human", "gpt"] | None:
    """'human' or 'gpt' for any spelling the formats use (human/user, gpt/assistant, any case); else None."""
    role = str(value).lower()
    return "human" if role in HUMAN_ROLES else "gpt" if role in GPT_ROLES else None


def parse_turns(raw: Any, source: str, record_id: str, field_name: str, require_response: bool = True) -> list[Turn]:
    """The one turn-list check (the paper's conversations, build-pairs' conversation records): human/gpt turns
    in any spelling, the last a gpt turn (the response) with a human turn before it; `require_response`: a
    non-empty one."""
    if not isinstance(raw, list) or not raw:
        raise RecordError(source, record_id, field_name, "expected a non-empty list of turns")
    turns = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise RecordError(source, record_id, f"{field_name}[{i}]", "expected {'from': ..., 'value': ...}")
        role = canonical_role(t["from"])
        if role is None:
            raise RecordError(source, record_id, f"{field_name}[{i}].from", f"unknown role {t['from']!r}")
        if not isinstance(t["value"], str):
            raise RecordError(source, record_id, f"{field_name}[{i}].value", "expected a string")
        turns.append(Turn(role, t["value"]))
    last = max((i for i, t in enumerate(turns) if t.role == "gpt"), default=None)
    if last is None:
        raise RecordError(source, record_id, field_name, "no gpt turn (the response)")
    if last != len(turns) - 1:
        raise RecordError(source, record_id, f"{field_name}[{last + 1}]", "turns after the last gpt turn (the response)")
    if require_response and not turns[-1].text.strip():
        raise RecordError(source, record_id, field_name, "the response (last gpt turn) is empty")
    if not any(t.role == "human" for t in turns[:-1]):
        raise RecordError(source, record_id, field_name, "no human turn before the response")
    return turns


def with_image_placeholder(prompt: list[Turn]) -> tuple[tuple[Turn, ...], bool]:
    """Ensure exactly one `<image>` in the prompt; insert it before the first human turn if absent."""
    count = sum(t.text.count(IMAGE_TOKEN) for t in prompt)
    if count > 1:
        raise ValueError(f"{count} {IMAGE_TOKEN} placeholders; one image per pair is supported")
    if count == 1:
        return tuple(prompt), False
    first = next(i for i, t in enumerate(prompt) if t.role == "human")
    fixed = list(prompt)
    fixed[first] = Turn("human", f"{IMAGE_TOKEN}\n{prompt[first].text}")
    return tuple(fixed), True


PAPER_FIELDS = frozenset({"id", "image", "conversations", "rejected_conversations", "rejected_image",
                          "weighted_score", "pair_type"})


FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32: the dtype weights are batched and used in


def check_score(score: Any, source: str, rid: str) -> float | None:
    """weighted_score: absent/None, or a number finite in float32, the dtype it is used in (not a bool, not a
    string, not NaN/inf, not a value like 1e39 that JSON and Python hold but float32 turns into inf)."""
    if score is None:
        return None
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise RecordError(source, rid, "weighted_score", f"expected a finite number, got {score!r}")
    if abs(float(score)) > FLOAT32_MAX:
        raise RecordError(source, rid, "weighted_score",
                          f"{score!r} is inf in float32, the dtype the loss uses (largest finite: {FLOAT32_MAX:.4g})",
                          reason="field weighted_score: inf in float32")
    return float(score)


def finish_record(raw: dict[str, Any], source: str, rid: str, image: Any, prompt: tuple[Turn, ...], chosen: str,
                  rejected: str, rejected_image: Any, rejected_field: str, known: frozenset[str]) -> PreferenceRecord:
    """Checks shared by every format (score, pair type, chosen != rejected) and the record itself.

    pair_type: "image" (the same answer on both sides, the image rejected) when the record says so or has a
    rejected_image and equal answers; else "text". An image pair may leave its m' to data.corruption; whether
    the formulation gets an m' and a difference it can learn from is checked at setup (data/needs.py)."""
    score = check_score(raw.get("weighted_score"), source, rid)
    pair_type = raw.get("pair_type") or ("image" if rejected_image is not None and chosen == rejected else "text")
    if pair_type not in ("text", "image"):
        raise RecordError(source, rid, "pair_type", f"expected 'text' or 'image', got {pair_type!r}")
    if chosen.strip() == rejected.strip() and pair_type == "text":
        raise RecordError(source, rid, rejected_field, "the rejected response equals the chosen one")
    meta = {k: v for k, v in raw.items() if k not in known}
    return PreferenceRecord(
        id=rid, image=image, prompt=prompt, chosen=chosen, rejected=rejected, rejected_image=rejected_image,
        weighted_score=score, pair_type=pair_type, source=source, meta=meta,
    )


def parse_paper_record(raw: Any, source: str, image_root: Path | ImageRoots) -> tuple[PreferenceRecord, bool]:
    """Parse one record of the paper's format. Returns the record and whether a placeholder was inserted."""
    if not isinstance(raw, dict):
        raise RecordError(source, None, "<record>", f"expected a JSON object, got {type(raw).__name__}")
    rid = raw.get("id")
    if rid is None or (isinstance(rid, str) and not rid.strip()):
        raise RecordError(source, None, "id", "missing")
    rid = str(rid)
    for name in ("image", "conversations", "rejected_conversations"):
        if name not in raw:
            raise RecordError(source, rid, name, "missing")
    chosen_turns = parse_turns(raw["conversations"], source, rid, "conversations")
    rejected_turns = parse_turns(raw["rejected_conversations"], source, rid, "rejected_conversations")
    if [t.text.replace(IMAGE_TOKEN, "").strip() for t in chosen_turns[:-1]] != [
        t.text.replace(IMAGE_TOKEN, "").strip() for t in rejected_turns[:-1]
    ]:
        raise RecordError(source, rid, "rejected_conversations", "its prompt turns differ from conversations'")
    try:
        prompt, inserted = with_image_placeholder(chosen_turns[:-1])
    except ValueError as e:
        raise RecordError(source, rid, "conversations", str(e)) from e
    image = resolve_image(image_root, raw["image"], source, rid, "image")
    rejected_image = None
    if raw.get("rejected_image") is not None:
        rejected_image = resolve_image(image_root, raw["rejected_image"], source, rid, "rejected_image")
    record = finish_record(raw, source, rid, image, prompt, chosen_turns[-1].text, rejected_turns[-1].text,
                           rejected_image, "rejected_conversations", PAPER_FIELDS)
    return record, inserted


def valid_rows(rows: Iterable[tuple[str, Any]], parse: Callable[[Any, str, int], T], on_skip: Callable[[RecordError], None],
               skip_invalid: bool, *, id_of: Callable[[T], Any] = lambda parsed: parsed.id,
               id_field: str = "id") -> Iterator[T]:
    """The one read/validate/skip loop of every reader (training files, build-pairs input, benchmark
    questions): each row parsed (`parse(raw, source, index)`); a malformed line, a parse error or a repeated
    id raises its RecordError, or with skip_invalid goes to `on_skip` and is left out."""
    seen: dict[str, str] = {}
    for index, (source, raw) in enumerate(rows):
        try:
            if isinstance(raw, RecordError):  # a malformed JSONL line, kept in its place by load_json_records
                raise raw
            parsed = parse(raw, source, index)
            key = str(id_of(parsed))
            if key in seen:
                raise RecordError(source, key, id_field, f"duplicate of the record at {seen[key]}")
            seen[key] = source
        except RecordError as e:
            if not skip_invalid:
                raise
            on_skip(e)
            continue
        yield parsed


def collect(rows: Iterable[tuple[str, Any]], parse: Callable[[Any, str, int], tuple[PreferenceRecord, bool]],
            skip_invalid: bool, report: ReadReport | None = None) -> tuple[list[PreferenceRecord], ReadReport]:
    """Parse rows into records: duplicates and bad records raise, or are counted with skip_invalid."""
    report = report or ReadReport()
    records: list[PreferenceRecord] = []
    for record, inserted in valid_rows(rows, parse, report.skip, skip_invalid, id_of=lambda parsed: parsed[0].id):
        report.read += 1
        report.placeholder_inserted += inserted
        records.append(record)
    return records, report


def read_preference_file(
    path: str | Path, image_root: str | Path | None = None, *, skip_invalid: bool = False,
    rejected_image_root: str | Path | None = None,
) -> tuple[list[PreferenceRecord], ReadReport]:
    """Read and validate a preference file. Errors raise unless skip_invalid, which counts and reports them."""
    path = Path(path)
    root = ImageRoots(Path(image_root) if image_root is not None else path.parent,
                      Path(rejected_image_root) if rejected_image_root is not None else None)
    return collect(load_json_records(path), lambda raw, src, i: parse_paper_record(raw, src, root), skip_invalid)
