"""Input formats beside the paper's, mapped to the same `PreferenceRecord` (docs/design.md §5).

Formats (`read_records(source, format=...)`):
  * "paper": the paper's released records ({id, image, conversations, rejected_conversations, ...}) in a
    JSON array, JSONL or Parquet file, or in a `datasets` dataset.
  * "trl": TRL's preference format, one row per pair with `prompt`, `chosen`, `rejected` and `images`
    (or `image`). `prompt` is a string or a list of {"role", "content"} messages (roles user/human and
    assistant/gpt); `chosen` / `rejected` are a string or a list holding one assistant message (without
    a `prompt` column: the whole conversations, whose turns before the last assistant message must
    agree - TRL's "implicit prompt"). `content` is a string or a list of parts {"type": "image"} and
    {"type": "text", "text": ...}; parts are joined with "\\n" and an image part becomes `<image>`.
    `images` is a list with exactly one image (more is an error: one image per pair is supported): a path
    relative to the image root, or a `datasets` Image value ({"bytes", "path"} or a PIL image), which the
    record then carries as a PIL image. Optional columns: `id` (default "<file stem>-<row>"),
    `rejected_image`, `weighted_score`, `pair_type`; other columns go to `meta`.
  * "kto": TRL's unpaired preference format, for `modules.KTO`: one row per example with `prompt`,
    `completion` (a string or one assistant message), `label` (true = desirable, false = undesirable)
    and `images`; `id` optional as in "trl". The record's `chosen` holds the completion.
  * "hf_dataset": a `datasets` dataset: a `save_to_disk` directory (load_from_disk; for a DatasetDict the
    split named by `split`, or the only one), or a local JSON/JSONL/Parquet/CSV file through
    `load_dataset`. Its rows are paper, TRL or KTO records (detected from the columns). Image features are read
    undecoded (Arrow) and opened per record, so a broken image is an error naming that row.
  * "auto": a directory is "hf_dataset"; a file is "paper", "trl" or "kto" by the fields of its first record.

Every problem is a `RecordError` naming the file, the row (line or index), the record id and the field;
with `skip_invalid` it is counted in the `ReadReport` instead. A prompt without an image placeholder
gets one inserted before its first user turn, and is counted.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError

from lightning_meddpo.data.records import (
    IMAGE_TOKEN,
    ImageRoots,
    PreferenceRecord,
    ReadReport,
    RecordError,
    Turn,
    canonical_role,
    collect,
    finish_record,
    load_json_records,
    parse_paper_record,
    resolve_image,
    with_image_placeholder,
)

Format = Literal["auto", "paper", "trl", "kto", "hf_dataset"]
FORMATS = ("auto", "paper", "trl", "kto", "hf_dataset")
Schema = Literal["paper", "trl", "kto"]
TRL_FIELDS = frozenset({"id", "prompt", "chosen", "rejected", "images", "image", "rejected_image",
                        "weighted_score", "pair_type"})
KTO_FIELDS = frozenset({"id", "prompt", "completion", "label", "images", "image"})
Row = tuple[str, Any]  # (source label, raw record or the RecordError it produced)


# ---------------------------------------------------------------------------------------- containers


def load_parquet_rows(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a broken file
        raise RecordError(str(path), None, "<file>", f"cannot read Parquet: {e}") from e
    return [(f"{path}[row {i}]", r) for i, r in enumerate(table.to_pylist())]


def load_hf_dataset(path: Path, split: str | None = None):
    """A `datasets.Dataset` from a save_to_disk directory or a local data file."""
    import datasets

    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise RecordError(str(path), None, "<directory>", f"not a datasets save_to_disk directory: {e}") from e
    else:
        builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
        if builder is None:
            raise RecordError(str(path), None, "<file>", "expected a .json, .jsonl, .parquet or .csv file "
                              "for format 'hf_dataset', or a save_to_disk directory")
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if split is not None and split in ds:
            ds = ds[split]
        elif len(names) == 1:
            ds = ds[names[0]]
        else:
            raise RecordError(str(path), None, "<split>", f"the DatasetDict has splits {names}; "
                              f"none is {split!r}: pass split=")
    return ds


def dataset_rows(ds: Any, label: str, batch_size: int = 256) -> list[Row]:
    """Rows of a `datasets.Dataset` as plain dicts, image features undecoded ({"bytes", "path"}).

    Columns of the `Json` feature (what load_dataset makes of a JSON column whose rows mix strings and
    message lists) are stored as JSON text in Arrow and are decoded here."""
    json_cols = [name for name, f in (ds.features or {}).items() if type(f).__name__ == "Json"]
    rows: list[Row] = []
    arrow = ds.with_format("arrow")
    for start in range(0, len(ds), batch_size):
        for j, r in enumerate(arrow[start:start + batch_size].to_pylist()):
            source = f"{label}[{start + j}]"
            try:
                for name in json_cols:
                    if isinstance(r.get(name), str):
                        r[name] = json.loads(r[name])
            except json.JSONDecodeError as e:
                rows.append((source, RecordError(source, None, name, f"malformed JSON: {e}")))
                continue
            rows.append((source, r))
    return rows


def _first_record(rows: list[Row]) -> dict[str, Any] | None:
    return next((r for _, r in rows if isinstance(r, dict)), None)


def detect_schema(rows: list[Row], label: str) -> Schema:
    """"paper", "trl" or "kto" from the fields of the first record."""
    first = _first_record(rows)
    if first is None:
        raise RecordError(label, None, "<file>", "no records to read")
    fields = set(first)
    if {"conversations", "rejected_conversations"} <= fields:
        return "paper"
    if {"chosen", "rejected"} <= fields:
        return "trl"
    if {"completion", "label"} <= fields:
        return "kto"
    raise RecordError(label, None, "<record>", f"cannot tell the format from the fields {sorted(fields)}: expected "
                      "'conversations' + 'rejected_conversations' (paper), 'chosen' + 'rejected' (TRL) or "
                      "'completion' + 'label' (KTO)")


def _file_rows(path: Path) -> list[Row]:
    if path.suffix == ".parquet":
        return load_parquet_rows(path)
    return load_json_records(path)


# ---------------------------------------------------------------------------------------------- TRL


def _content(content: Any, source: str, rid: str, field_name: str, allow_image: bool) -> str:
    """A message's content (string or list of parts) as text with `<image>` for an image part."""
    if isinstance(content, str):
        if not allow_image and IMAGE_TOKEN in content:
            raise RecordError(source, rid, field_name, f"an {IMAGE_TOKEN} placeholder in a response")
        return content
    if not isinstance(content, list):
        raise RecordError(source, rid, field_name, f"expected a string or a list of parts, got {type(content).__name__}")
    pieces = []
    for j, part in enumerate(content):
        where = f"{field_name}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            if not allow_image:
                raise RecordError(source, rid, where, "an image part in a response")
            pieces.append(IMAGE_TOKEN)
        elif kind == "text":
            if not isinstance(part.get("text"), str):
                raise RecordError(source, rid, f"{where}.text", "expected a string")
            pieces.append(part["text"])
        else:
            raise RecordError(source, rid, where, "expected {'type': 'image'} or {'type': 'text', 'text': ...}, "
                              f"got {part!r:.200}")
    return "\n".join(pieces)


def _messages(raw: Any, source: str, rid: str, field_name: str) -> list[Turn]:
    if not isinstance(raw, list) or not raw:
        raise RecordError(source, rid, field_name, "expected a string or a non-empty list of messages")
    turns = []
    for i, m in enumerate(raw):
        where = f"{field_name}[{i}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RecordError(source, rid, where, "expected {'role': ..., 'content': ...}")
        role = canonical_role(m["role"])
        if role is None:
            raise RecordError(source, rid, f"{where}.role", f"unsupported role {m['role']!r} (user or assistant)")
        turns.append(Turn(role, _content(m["content"], source, rid, f"{where}.content", role == "human")))
    return turns


def _response(raw: Any, source: str, rid: str, field_name: str) -> str:
    if isinstance(raw, str):
        text = raw
    else:
        turns = _messages(raw, source, rid, field_name)
        if len(turns) != 1 or turns[0].role != "gpt":
            raise RecordError(source, rid, field_name, "expected one assistant message (the prompt is in 'prompt')")
        text = turns[0].text
    if not text.strip():
        raise RecordError(source, rid, field_name, "the response is empty")
    return text


def _prompt(p: Any, source: str, rid: str) -> list[Turn]:
    """An explicit `prompt`: a string (one user turn) or messages ending with a user message."""
    if isinstance(p, str):
        if not p.strip():
            raise RecordError(source, rid, "prompt", "the prompt is empty")
        return [Turn("human", p)]
    prompt = _messages(p, source, rid, "prompt")
    if prompt[-1].role != "human":
        raise RecordError(source, rid, "prompt", "the prompt must end with a user message")
    return prompt


def _placed(prompt: list[Turn], source: str, rid: str) -> tuple[tuple[Turn, ...], bool]:
    try:
        return with_image_placeholder(prompt)
    except (ValueError, StopIteration) as e:
        raise RecordError(source, rid, "prompt", str(e) or "no user message") from e


def _row_id(raw: dict[str, Any], default_id: str) -> str:
    rid = raw.get("id")
    return default_id if rid is None or str(rid).strip() == "" else str(rid)


def _prompt_and_responses(raw: dict[str, Any], source: str, rid: str) -> tuple[list[Turn], str, str]:
    if raw.get("prompt") is not None:
        prompt = _prompt(raw["prompt"], source, rid)
        return prompt, _response(raw["chosen"], source, rid, "chosen"), _response(raw["rejected"], source, rid, "rejected")
    # implicit prompt: chosen and rejected are whole conversations sharing every turn but the last
    convs = {}
    for name in ("chosen", "rejected"):
        turns = _messages(raw[name], source, rid, name)
        if turns[-1].role != "gpt":
            raise RecordError(source, rid, name, "without a 'prompt', the last message must be the assistant's response")
        if not any(t.role == "human" for t in turns[:-1]):
            raise RecordError(source, rid, name, "no 'prompt' column and no user message before the response")
        if not turns[-1].text.strip():
            raise RecordError(source, rid, name, "the response is empty")
        convs[name] = turns
    if convs["chosen"][:-1] != convs["rejected"][:-1]:
        raise RecordError(source, rid, "rejected", "its turns before the response differ from chosen's")
    return convs["chosen"][:-1], convs["chosen"][-1].text, convs["rejected"][-1].text


def open_image_bytes(data: bytes, source: str, rid: str, field_name: str) -> Image.Image:
    """A PIL image (not yet decoded: that happens, with max_pixels, when the DataModule validates)."""
    try:
        return Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as e:
        raise RecordError(source, rid, field_name, f"cannot identify the image bytes: {e}") from e


def image_value(value: Any, image_root: Path | ImageRoots, source: str, rid: str, field_name: str) -> Path | Image.Image:
    """A path (relative to the image root), a `datasets` Image value {"bytes", "path"}, or a PIL image."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (bytes, bytearray)):
        return open_image_bytes(bytes(value), source, rid, field_name)
    if isinstance(value, dict) and set(value) <= {"bytes", "path"}:
        if value.get("bytes") is not None:
            return open_image_bytes(value["bytes"], source, rid, field_name)
        value = value.get("path")
    return resolve_image(image_root, value, source, rid, field_name)


def _one_image(raw: dict[str, Any], source: str, rid: str, image_root: Path | ImageRoots) -> Path | Image.Image:
    name = "images" if "images" in raw else "image"
    value = raw.get(name)
    if value is None:
        raise RecordError(source, rid, "images", "missing (one image per pair is required)")
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise RecordError(source, rid, name, f"{len(value)} images; exactly one image per pair is supported")
        return image_value(value[0], image_root, source, rid, f"{name}[0]")
    return image_value(value, image_root, source, rid, name)


def parse_trl_record(raw: Any, source: str, image_root: Path | ImageRoots, default_id: str) -> tuple[PreferenceRecord, bool]:
    """One TRL preference row -> (record, whether an image placeholder was inserted)."""
    if not isinstance(raw, dict):
        raise RecordError(source, None, "<record>", f"expected an object, got {type(raw).__name__}")
    rid = _row_id(raw, default_id)
    for name in ("chosen", "rejected"):
        if raw.get(name) is None:
            raise RecordError(source, rid, name, "missing")
    prompt, chosen, rejected = _prompt_and_responses(raw, source, rid)
    prompt_t, inserted = _placed(prompt, source, rid)
    image = _one_image(raw, source, rid, image_root)
    rejected_image = None
    if raw.get("rejected_image") is not None:
        rejected_image = image_value(raw["rejected_image"], image_root, source, rid, "rejected_image")
    record = finish_record(raw, source, rid, image, prompt_t, chosen, rejected, rejected_image, "rejected", TRL_FIELDS)
    return record, inserted


def parse_kto_record(raw: Any, source: str, image_root: Path | ImageRoots, default_id: str) -> tuple[PreferenceRecord, bool]:
    """One unpaired KTO row (prompt, completion, label, images) -> (record with `desirable`, placeholder inserted)."""
    if not isinstance(raw, dict):
        raise RecordError(source, None, "<record>", f"expected an object, got {type(raw).__name__}")
    rid = _row_id(raw, default_id)
    for name in ("prompt", "completion", "label"):
        if raw.get(name) is None:
            raise RecordError(source, rid, name, "missing")
    if not isinstance(raw["label"], bool):
        raise RecordError(source, rid, "label", f"expected true (desirable) or false (undesirable), got {raw['label']!r}")
    prompt, inserted = _placed(_prompt(raw["prompt"], source, rid), source, rid)
    record = PreferenceRecord(
        id=rid, image=_one_image(raw, source, rid, image_root), prompt=prompt,
        chosen=_response(raw["completion"], source, rid, "completion"), rejected="", source=source,
        meta={k: v for k, v in raw.items() if k not in KTO_FIELDS}, desirable=raw["label"],
    )
    return record, inserted


# ------------------------------------------------------------------------------------------ reading


def detect_format(path: str | Path) -> Literal["paper", "trl", "kto", "hf_dataset"]:
    """'hf_dataset' for a directory, else 'paper', 'trl' or 'kto' from the first record's fields."""
    path = Path(path)
    if path.is_dir():
        return "hf_dataset"
    if not path.is_file():
        raise FileNotFoundError(f"preference data not found: {path}")
    return detect_schema(_file_rows(path), str(path))


def read_records(
    source: str | Path | Any,
    image_root: str | Path | None = None,
    *,
    format: Format = "auto",
    skip_invalid: bool = False,
    split: str | None = None,
    rejected_image_root: str | Path | None = None,
) -> tuple[list[PreferenceRecord], ReadReport]:
    """Read preference records of any supported format (see the module docstring).

    `source` is a file, a save_to_disk directory, or a `datasets.Dataset` object. Image paths are
    relative to `image_root` (default: the file's directory, or the dataset directory); rejected images to
    `rejected_image_root` (default: `image_root`).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if not isinstance(source, (str, Path)):  # a datasets.Dataset object
        label = getattr(source, "info", None) and source.info.dataset_name or "dataset"
        rows = dataset_rows(source, label)
        root = ImageRoots(Path(image_root) if image_root is not None else Path.cwd(), _opt_path(rejected_image_root))
        schema = format if format in ("paper", "trl", "kto") else detect_schema(rows, label)
        return _parse_rows(rows, schema, root, label, skip_invalid)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"preference data not found: {path}")
    if format == "auto" and path.is_dir():
        format = "hf_dataset"
    root = ImageRoots(Path(image_root) if image_root is not None else (path if path.is_dir() else path.parent),
                      _opt_path(rejected_image_root))
    if format == "hf_dataset":
        label = f"{path}[{split}]" if split else str(path)
        rows = dataset_rows(load_hf_dataset(path, split), label)
        return _parse_rows(rows, detect_schema(rows, label), root, path.stem if path.is_file() else path.name, skip_invalid)
    if path.is_dir():
        raise RecordError(str(path), None, "<file>", f"a directory; use format 'hf_dataset' (not {format!r})")
    rows = _file_rows(path)
    schema = detect_schema(rows, str(path)) if format == "auto" else format
    return _parse_rows(rows, schema, root, path.stem, skip_invalid)


def _opt_path(value: str | Path | None) -> Path | None:
    return Path(value) if value is not None else None


def _parse_rows(rows: list[Row], schema: str, root: ImageRoots, stem: str, skip_invalid: bool):
    if schema == "paper":
        return collect(rows, lambda raw, src, i: parse_paper_record(raw, src, root), skip_invalid)
    stem = stem or "row"
    parse = parse_kto_record if schema == "kto" else parse_trl_record
    return collect(rows, lambda raw, src, i: parse(raw, src, root, f"{stem}-{i}"), skip_invalid)
