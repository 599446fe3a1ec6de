"""The records build-pairs reads: LLaVA-Med questions, conversations, captions and reports, read by the one
reader of those formats (data/llava_med.py) into a `SourceItem`, or refused with a RecordError naming the record
and field. Image paths must stay inside the image root (records.relative_image_path)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from lightning_meddpo.data.llava_med import read_llava_med
from lightning_meddpo.data.records import (
    IMAGE_TOKEN,
    RecordError,
    Turn,
    default_id,
    relative_image_path,
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


def _parse_region(region: Any, source: str, rid: str) -> dict[str, Any]:
    """A record's lesion region for region_noise: {"box": [x0, y0, x1, y1]} (pixels) or {"mask": "rel.png"}."""
    if isinstance(region, dict) and set(region) == {"box"}:
        box = region["box"]
        if (isinstance(box, list) and len(box) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            return {"box": box}
    elif isinstance(region, dict) and set(region) == {"mask"}:
        return {"mask": relative_image_path(region["mask"], source, rid, "region.mask")}
    raise RecordError(source, rid, "region", f"expected {{'box': [x0, y0, x1, y1]}} or {{'mask': 'path'}}, "
                      f"got {region!r}")


def parse_source_record(raw: Any, source: str) -> SourceItem:
    """One input record (question, conversations or caption / report format) -> SourceItem; problems raise
    RecordError. A caption or report is asked with CAPTION_PROMPT; the prompt gets one `<image>` (inserted before
    the first human turn where the file has none)."""
    record = read_llava_med(raw, source, Counter(), missing_id=default_id(source))
    rid = str(record.id)
    turns = record.turns or (Turn("human", CAPTION_PROMPT),)
    extra = {k: raw[k] for k in ("answer_type",) if k in raw} if record.kind == "vqa" else {}
    if "region" in raw:
        extra["region"] = _parse_region(raw["region"], source, rid)
    try:
        placed, inserted = with_image_placeholder(list(turns))
    except ValueError as e:
        raise RecordError(source, rid, "conversations" if record.kind == "conversation" else "text", str(e)) from e
    prompt = [{"from": t.role, "value": t.text} for t in placed]
    return SourceItem(rid, source, record.image, prompt, record.answer, inserted, extra)
