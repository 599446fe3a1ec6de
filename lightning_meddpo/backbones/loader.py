"""Loading a backbone (model + processor) from a local directory, a hub id, or `tiny://<text_model>`.

Every backbone goes through `from_pretrained`; the tiny one is built to a cache directory first.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, ProcessorMixin, PreTrainedModel

from lightning_meddpo.backbones.templates import get_chat_template
from lightning_meddpo.backbones.tiny import TINY_SCHEME, resolve_tiny


def resolve_backbone(name_or_path: str) -> str:
    """A path or hub id that `from_pretrained` understands."""
    if name_or_path.startswith(TINY_SCHEME):
        return str(resolve_tiny(name_or_path))
    return name_or_path


def load_processor(
    name_or_path: str, *, chat_template: str | None = None, trust_remote_code: bool = False
) -> ProcessorMixin:
    """The backbone's processor; `chat_template` names one of ours to override the checkpoint's."""
    processor = AutoProcessor.from_pretrained(resolve_backbone(name_or_path), trust_remote_code=trust_remote_code)
    if chat_template is not None:
        template = get_chat_template(chat_template)
        processor.chat_template = template
        processor.tokenizer.chat_template = template
    if getattr(processor.tokenizer, "chat_template", None) is None and getattr(processor, "chat_template", None) is None:
        raise ValueError(f"{name_or_path}: the processor has no chat template; set `chat_template` in the config")
    return processor


def load_model(
    name_or_path: str, *, dtype: torch.dtype | str | None = None, trust_remote_code: bool = False
) -> PreTrainedModel:
    """The vision-language model, on CPU, with dropout off (training mode is the module's business)."""
    return AutoModelForImageTextToText.from_pretrained(
        resolve_backbone(name_or_path), dtype=dtype or torch.float32, trust_remote_code=trust_remote_code
    )


def is_local_dir(name_or_path: str) -> bool:
    return Path(name_or_path).is_dir()
