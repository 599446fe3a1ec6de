"""The LLaVA-Med formats, read in one place: benchmark questions, captions / reports, and conversations.

    question      {question_id | id, image, text, answer | gpt4_answer, answer_type}   (VQA-RAD, SLAKE, PathVQA)
    report        {id | study_id, image_path | image_paths | image, report | caption}  (MIMIC-CXR, AMBOSS, NEJM)
    conversation  {id, image, conversations: [{from: human, value}, ..., {from: gpt, value}]}

build-pairs (commands/sources.py) makes pairs of all three; evaluation (eval/datamodule.py) asks the questions and
report prompts; the paper's preference format (records.py) shares the turn-list check and the image-path rule.
What a purpose adds (the image placeholder's placement, answer types, regions) stays with the purpose. Quirks that
are read through (a list of several images, a record without an id) are counted in `notes`; anything else is a
RecordError naming the record and the field.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from lightning_meddpo.data.records import (
    RecordError,
    Turn,
    parse_turns,
    relative_image_path,
)

Kind = Literal["vqa", "report", "conversation"]
ID_FIELDS = ("question_id", "id", "study_id")
IMAGE_FIELDS = {"vqa": ("image", "image_path", "image_paths"), "conversation": ("image", "image_path", "image_paths"),
                "report": ("image_path", "image_paths", "image")}
ANSWER_FIELDS = {"vqa": ("answer", "gpt4_answer"), "report": ("report", "caption")}


@dataclass(frozen=True)
class LlavaMedRecord:
    """One record as the file says it: the prompt turns before the answer (none for a report), the answer (None
    where the file has none and none was required) and where each came from."""

    id: Any  # as in the file (question ids are often ints); `missing_id` for a report without one
    kind: Kind
    image: str  # relative POSIX path inside the image root
    image_field: str
    image_value: str  # as written
    turns: tuple[Turn, ...]
    answer: str | None
    answer_field: str | None


def kind_of(raw: dict) -> Kind | None:
    if "conversations" in raw:
        return "conversation"
    if "text" in raw:
        return "vqa"
    if "caption" in raw or "report" in raw:
        return "report"
    return None


def _sid(rid: Any) -> str | None:
    return None if rid is None else str(rid)


def text_field(raw: dict, name: str, source: str, rid: Any, *, allow_empty: bool = False) -> str:
    """A string field (a number is read as its text)."""
    value = raw.get(name)
    if value is None:
        raise RecordError(source, _sid(rid), name, "missing")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RecordError(source, _sid(rid), name, f"expected a string, got {type(value).__name__}")
    value = str(value)
    if not allow_empty and not value.strip():
        raise RecordError(source, _sid(rid), name, "is empty")
    return value


def first_image(raw: dict, names: tuple[str, ...], source: str, rid: Any, notes: Counter) -> tuple[str, str]:
    """(field name, path as written) of the record's image; of a list, the first (counted: one image per prompt)."""
    name = next((n for n in names if raw.get(n) is not None), None)
    if name is None:
        raise RecordError(source, _sid(rid), names[0], f"missing (expected {', '.join(names)})")
    value = raw[name]
    if isinstance(value, list):
        if not value:
            raise RecordError(source, _sid(rid), name, "is an empty list of images")
        if len(value) > 1:
            notes[f"had {name} lists of several images (the first was used)"] += 1
        value = value[0]
    if not isinstance(value, str):
        raise RecordError(source, _sid(rid), name, f"expected an image path, got {value!r}")
    return name, value


def read_llava_med(raw: Any, source: str, notes: Counter, *, kind: Kind | Literal["auto"] = "auto",
                   answer_field: str | None = None, require_answer: bool = True,
                   missing_id: str | None = None) -> LlavaMedRecord:
    """One record of a LLaVA-Med format (`kind` "auto": conversations, a question `text`, or a report / caption).
    `answer_field` names the answer's field instead of the format's (`answer` before `gpt4_answer`, `report` before
    `caption`); an empty answer is returned as it is (its reader decides); a report without an id gets
    `missing_id` (counted)."""
    if not isinstance(raw, dict):
        raise RecordError(source, None, "<record>", f"expected a JSON object, got {type(raw).__name__}")
    kind = kind_of(raw) if kind == "auto" else kind
    rid = next((raw[k] for k in ID_FIELDS if raw.get(k) is not None and str(raw[k]).strip()), None)
    if kind is None:
        raise RecordError(source, _sid(rid), "<record>", "expected 'conversations', a question ('text' with 'answer' "
                          "or 'gpt4_answer') or a 'caption'/'report'")
    if rid is None and kind == "report" and missing_id is not None:
        rid = missing_id  # the released AMBOSS files have no ids: file stem and line
        notes["had no id (file:line used)"] += 1
    if rid is None:
        raise RecordError(source, None, ID_FIELDS[0], "missing record id (question_id, id or study_id)")
    image_field, image_value = first_image(raw, IMAGE_FIELDS[kind], source, rid, notes)
    image = relative_image_path(image_value, source, _sid(rid), image_field)
    if kind == "conversation":
        turns = parse_turns(raw["conversations"], source, _sid(rid), "conversations", require_response=False)
        last = len(turns) - 1
        return LlavaMedRecord(rid, kind, image, image_field, image_value, tuple(turns[:-1]), turns[-1].text,
                              f"conversations[{last}].value")
    turns = (Turn("human", text_field(raw, "text", source, rid)),) if kind == "vqa" else ()
    names = (answer_field,) if answer_field else ANSWER_FIELDS[kind]
    name = next((n for n in names if raw.get(n) is not None), None)
    if name is None and require_answer:
        raise RecordError(source, _sid(rid), names[0], f"missing (expected one of {list(names)})")
    answer = text_field(raw, name, source, rid, allow_empty=True) if name else None
    return LlavaMedRecord(rid, kind, image, image_field, image_value, turns, answer, name)
