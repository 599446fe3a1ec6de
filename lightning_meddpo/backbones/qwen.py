"""Qwen2-VL / Qwen2.5-VL backbones (HuatuoGPT-Vision ships a Qwen2.5-VL version).

Real checkpoints load through `AutoModelForImageTextToText` like any other backbone (loader.py).
This file builds *tiny* Qwen2-VL / Qwen2.5-VL models from config, with a Qwen2VLProcessor (PIL image
processor) and a BPE tokenizer trained in-process with the Qwen special tokens, so the Qwen path
(M-RoPE, `image_grid_thw`, `mm_token_type_ids`) is exercised offline by the tests and by
`tiny://qwen2_vl` / `tiny://qwen2_5_vl`.

Qwen-VL prompts want the image wrapped as `<|vision_start|><|image_pad|><|vision_end|>`; set the
DataModule's `image_placeholder` to QWEN_IMAGE_PLACEHOLDER (the processor expands `<|image_pad|>`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    ProcessorMixin,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]
QWEN_IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"

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


VERSIONS = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
}


def train_qwen_tokenizer(corpus: list[str], vocab_size: int = 600) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=QWEN_SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([*corpus, "user assistant system"], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=QWEN_SPECIAL_TOKENS[1:], chat_template=CHATML,
    )


def build_tiny_qwen_vl(
    out_dir: str | Path,
    *,
    version: str = "qwen2_vl",
    hidden_size: int = 64,
    num_layers: int = 2,
    patch_size: int = 8,
    image_size: int = 32,
    corpus: list[str] | None = None,
    seed: int = 0,
) -> Path:
    """Build, initialise (seeded) and save a tiny Qwen2-VL or Qwen2.5-VL model and its processor."""
    if version not in VERSIONS:
        raise ValueError(f"unknown Qwen-VL version {version!r}; known: {sorted(VERSIONS)}")
    if corpus is None:
        from lightning_meddpo.data.synthetic import demo_corpus

        corpus = demo_corpus()
    tokenizer = train_qwen_tokenizer(corpus)
    merge = 2
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=patch_size, merge_size=merge,
        temporal_patch_size=2,
    )
    processor = QwenVLImageProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHATML)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = hidden_size // 4
    quarter = head_dim // 2
    text = dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "mrope_section": [quarter - 2 * (quarter // 3), quarter // 3, quarter // 3]},
        pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        tie_word_embeddings=False,
    )
    if version == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=hidden_size, mlp_ratio=2, num_heads=2,
                      patch_size=patch_size, spatial_merge_size=merge, temporal_patch_size=2)
    else:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=hidden_size, num_heads=2,
                      patch_size=patch_size, spatial_merge_size=merge, temporal_patch_size=2, window_size=2 * patch_size * merge,
                      fullatt_block_indexes=[1])
    config_cls, model_cls = VERSIONS[version]
    config = config_cls(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    save_processor(processor, out)
    return out
