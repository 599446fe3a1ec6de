"""Tiny Qwen2-VL / Qwen2.5-VL models for the demo and the tests (`tiny://qwen2_vl`, `tiny://qwen2_5_vl`).

Built from config, with a Qwen2VLProcessor (PIL image processor) and a BPE tokenizer trained in-process on
the demo corpus with the Qwen special tokens, so the Qwen path (M-RoPE, `image_grid_thw`,
`mm_token_type_ids`) runs offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from lightning_meddpo.backbones.qwen import (
    CHATML,
    QWEN_SPECIAL_TOKENS,
    QwenVLImageProcessor,
    save_processor,
)
from lightning_meddpo.cache import default_cache_dir
from lightning_meddpo.demo.tiny import build_once

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
        from lightning_meddpo.demo.synthetic import demo_corpus

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


def resolve_tiny_qwen(version: str) -> Path:
    """Build `tiny://qwen2_vl|qwen2_5_vl` once into the cache."""
    target = default_cache_dir() / "backbones" / f"tiny-{version}-v1"
    return build_once(target, lambda out: build_tiny_qwen_vl(out, version=version))
