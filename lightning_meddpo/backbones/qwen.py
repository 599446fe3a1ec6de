"""Qwen2-VL / Qwen2.5-VL backbones (HuatuoGPT-Vision ships a Qwen2.5-VL version).

The processor without torchvision (`load_qwen_vl_processor`): real checkpoints load through
`AutoModelForImageTextToText` like any other backbone (loader.py). The tiny Qwen-VL models of the demo
(`tiny://qwen2_vl`, `tiny://qwen2_5_vl`) are built in demo/tiny_qwen.py.

The family's adapter is qwen_vl.py (it wraps the prompt's image as `<|vision_start|><|image_pad|><|vision_end|>`,
so a config needs no `image_placeholder`).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    ProcessorMixin,
    Qwen2VLProcessor,
)

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]

# ChatML, as Qwen-VL instruct models use (string content; the image placeholder is in the text).
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN_VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


class QwenVLImageProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without its video processor.

    In transformers 5.24 the Qwen2-VL video processor needs torchvision; image-text preference
    training never uses it. Saved directories name `Qwen2VLProcessor` (see `save_processor`), so they
    load with AutoProcessor wherever torchvision is installed.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.video_processor = None


def load_qwen_vl_processor(path: str, trust_remote_code: bool = False) -> QwenVLImageProcessor:
    """Image processor + tokenizer + chat template of a Qwen-VL directory, without torchvision."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    image_processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, backend="pil")
    template = getattr(tokenizer, "chat_template", None)
    jinja = Path(path) / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text()
    return QwenVLImageProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


def save_processor(processor, out_dir: str | Path) -> None:
    """save_pretrained, naming Qwen2VLProcessor for our video-less variant."""
    processor.save_pretrained(out_dir)
    if isinstance(processor, QwenVLImageProcessor):
        for f in Path(out_dir).glob("*.json"):
            data = json.loads(f.read_text())
            if isinstance(data, dict):
                if data.get("processor_class") == type(processor).__name__:
                    data["processor_class"] = "Qwen2VLProcessor"
                    f.write_text(json.dumps(data, indent=2))
