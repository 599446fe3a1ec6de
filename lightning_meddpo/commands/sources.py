"""The records build-pairs reads: LLaVA-Med questions, conversations, captions and reports (see
build_pairs.py for the formats), each parsed into a `SourceItem` or refused with a RecordError naming the
record and field. Image paths must stay inside the image root."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from lightning_meddpo.data.records import (
    IMAGE_TOKEN,
    RecordError,
    Turn,
    canonical_role,
    default_id,
    with_image_placeholder,
)

CAPTION_PROMPT = "Describe the findings in this medical image."


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
