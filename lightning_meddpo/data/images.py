"""Image loading (and, later, seeded corruptions for image-side preference terms)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError


def load_image(path: str | Path, *, record_id: str | None = None, field_name: str = "image") -> Image.Image:
    """Decode an image fully and return it as RGB; failures name the record and the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB") if im.mode != "RGB" else im.copy()
    except (OSError, UnidentifiedImageError, ValueError) as e:
        rid = f" id={record_id!r}" if record_id else ""
        raise ValueError(f"record{rid}: field {field_name!r}: cannot decode image {path}: {e}") from e
