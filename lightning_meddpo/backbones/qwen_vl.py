"""Qwen2-VL / Qwen2.5-VL (HuatuoGPT-Vision ships a Qwen2.5-VL version): a `visual` tower whose merger is the
projector, `image_grid_thw` beside the pixels, 3-D rope positions, `<|vision_start|><|image_pad|><|vision_end|>`
in the prompt. The processor loads without torchvision (qwen.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_meddpo.backbones.adapter import Backbone, register


class QwenVLBackbone(Backbone):
    name = "qwen_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    vision_tower = "visual"
    projector = "visual.merger"
    image_inputs = ("image_grid_thw",)
    image_token = "<|image_pad|>"
    image_placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    chat_template = "qwen2_vl"  # ChatML, as Qwen-VL instruct models use

    def positions(self, core: nn.Module, rows, row_images: Callable[[], object]) -> Tensor:
        """Qwen-VL's 3-D rope positions for the rows, restarted after the prompt for every response.

        `get_rope_index` numbers a row as one sequence; text positions grow by one per token in all three
        dimensions, so a later response is moved back by the length of the responses before it."""
        types = rows.extra.get("mm_token_type_ids")
        if types is None:
            raise ValueError("Qwen-VL rows need mm_token_type_ids (the processor returns them)")
        positions, _ = core.get_rope_index(
            rows.input_ids, mm_token_type_ids=types, image_grid_thw=row_images().extra["image_grid_thw"],
            attention_mask=rows.valid.long(),
        )
        index = torch.arange(rows.input_ids.shape[1], device=positions.device)
        shift = index[None] - rows.positions  # tokens of earlier responses in the row before this one
        return positions - shift[None].clamp(min=0) * (rows.segment_ids > 0)[None]

    def load_processor(self, path: str, trust_remote_code: bool = False):
        from transformers.utils import is_torchvision_available

        if is_torchvision_available():
            return super().load_processor(path, trust_remote_code)
        from lightning_meddpo.backbones.qwen import load_qwen_vl_processor

        # transformers' Qwen2-VL processor insists on a video processor, which needs torchvision
        return load_qwen_vl_processor(path, trust_remote_code=trust_remote_code)

    def save_processor(self, processor, out_dir) -> None:
        from lightning_meddpo.backbones.qwen import save_processor

        save_processor(processor, out_dir)


register(QwenVLBackbone())
