"""Loading a backbone (model + processor) from a local directory, a hub id, or `tiny://<name>`.

Every backbone goes through `from_pretrained` (`AutoModelForImageTextToText`): LLaVA with a Llama,
Mistral or Qwen2 text model (LLaVA-Med, HuatuoGPT-Vision v1), Qwen2-VL and Qwen2.5-VL
(HuatuoGPT-Vision's Qwen2.5-VL version); the family's adapter (backbones/adapter.py) loads the processor. A
name with a registered scheme is resolved to a directory first (registry.py: the demo's `tiny://llama|mistral|
qwen2|qwen2_vl|qwen2_5_vl`, built to a cache directory on first use). `trust_remote_code` is off unless the user
turns it on.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    PreTrainedModel,
    ProcessorMixin,
)

from lightning_meddpo.backbones.adapter import adapter_for_type
from lightning_meddpo.backbones.templates import get_chat_template
from lightning_meddpo.registry import backbone_scheme


def looks_like_a_path(name_or_path: str) -> bool:
    """A local path rather than a hub id ("org/name"): absolute, relative with ./ ../ ~, or several levels."""
    return name_or_path.startswith(("/", "./", "../", "~", ".")) or name_or_path.count("/") > 1 or "\\" in name_or_path


def resolve_backbone(name_or_path: str) -> str:
    """A path or hub id that `from_pretrained` understands; a local path that is not a directory is a
    FileNotFoundError saying so (from_pretrained would take it for a hub id and say something else)."""
    scheme = backbone_scheme(name_or_path)
    if scheme is not None:
        return str(scheme(name_or_path))
    if looks_like_a_path(name_or_path) and not Path(name_or_path).expanduser().is_dir():
        raise FileNotFoundError(f"backbone {name_or_path}: no such directory (a model directory, a hub id like "
                                "org/name, or tiny://llama)")
    return str(Path(name_or_path).expanduser()) if looks_like_a_path(name_or_path) else name_or_path


def model_type(path: str, trust_remote_code: bool = False) -> str | None:
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).model_type
    except (OSError, ValueError):
        return None


def load_processor(
    name_or_path: str, *, chat_template: str | None = None, trust_remote_code: bool = False
) -> ProcessorMixin:
    """The backbone's processor, loaded by its family's adapter; `chat_template` names one of ours to override the
    checkpoint's. A checkpoint without a template gets its family's default where the family has one (Qwen-VL:
    ChatML); else naming one is required."""
    path = resolve_backbone(name_or_path)
    adapter = adapter_for_type(model_type(path, trust_remote_code))
    processor = adapter.load_processor(path, trust_remote_code=trust_remote_code)
    has_own = getattr(processor.tokenizer, "chat_template", None) or getattr(processor, "chat_template", None)
    name = chat_template or (None if has_own else adapter.chat_template)
    if name is not None:
        template = get_chat_template(name)
        processor.chat_template = template
        processor.tokenizer.chat_template = template
    elif not has_own:
        raise ValueError(f"{name_or_path}: the processor has no chat template; set `chat_template` in the config")
    return processor


def load_model(
    name_or_path: str, *, dtype: torch.dtype | str | None = None, trust_remote_code: bool = False
) -> PreTrainedModel:
    """The vision-language model, on CPU, with dropout off (training mode is the module's business)."""
    return AutoModelForImageTextToText.from_pretrained(
        resolve_backbone(name_or_path), dtype=dtype or torch.float32, trust_remote_code=trust_remote_code
    )
