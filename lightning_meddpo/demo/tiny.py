"""The tiny offline backbone: a real LLaVA-architecture model small enough to train on a laptop CPU.

CLIP vision tower + Llama / Mistral / Qwen2 text model, built from config, with a BPE tokenizer
trained in-process on the demo corpus and a LlavaProcessor. It is saved to disk and always loaded
back through `from_pretrained`, so the demo and the tests run the same code path as a real checkpoint.

The vision tower is warm-started, as a real LLaVA's CLIP tower is pretrained: before saving, it learns for
a few hundred steps (about 2 s) to tell the modality, the organ and the lesion's side of freshly drawn demo
images (never the dataset's), read the way LLaVA reads it (layer -2, patch tokens). With a random tower
the tiny model's SFT learns the text prior only and answers every image alike; warm-started, it learns
to look within a CPU budget, so the demo can show what preference training does to visual errors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from lightning_meddpo.backbones.templates import get_chat_template
from lightning_meddpo.cache import default_cache_dir
from lightning_meddpo.demo import TINY_SCHEME

TEXT_CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
BUILD_VERSION = 3  # bump when the tiny build changes, so cached builds are redone (3: warm-started vision tower)
WARM_START_STEPS = 300


def train_tokenizer(corpus: list[str], vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus`, with `<image>` as a special token."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([*corpus, "USER: ASSISTANT:"], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens=["<image>"], chat_template=get_chat_template("tiny"),
    )


def build_tiny_backbone(
    out_dir: str | Path,
    *,
    text_model: str = "llama",
    image_size: int = 32,
    patch_size: int = 16,
    hidden_size: int = 64,
    num_layers: int = 2,
    corpus: list[str] | None = None,
    seed: int = 0,
    warm_start_steps: int = WARM_START_STEPS,
) -> Path:
    """Build, initialise (seeded), warm-start the vision tower and save a tiny LLaVA model and its processor."""
    if text_model not in TEXT_CONFIGS:
        raise ValueError(f"unknown tiny text model {text_model!r}; known: {sorted(TEXT_CONFIGS)}")
    if corpus is None:
        from lightning_meddpo.demo.synthetic import demo_corpus

        corpus = demo_corpus()
    tokenizer = train_tokenizer(corpus)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=get_chat_template("tiny"),
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch_size, projection_dim=32,
    )
    text = TEXT_CONFIGS[text_model](
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch_size) ** 2, vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    if warm_start_steps:
        warm_start_vision(model, image_processor, image_size, warm_start_steps, seed)
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def warm_start_vision(model: LlavaForConditionalGeneration, image_processor, image_size: int, steps: int, seed: int) -> None:
    """Train the vision tower to classify demo images' modality, organ and lesion side (see the module
    docstring); the classification heads are thrown away."""
    from lightning_meddpo.demo.synthetic import labelled_images

    images, labels = labelled_images(1024, image_size, seed)
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
    targets = torch.as_tensor(labels, dtype=torch.long)
    tower = model.model.vision_tower
    layer = model.config.vision_feature_layer
    width = tower.config.hidden_size
    heads = torch.nn.ModuleList(torch.nn.Linear(width, int(targets[:, k].max()) + 1) for k in range(targets.shape[1]))
    optimizer = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    tower.train()
    for _ in range(steps):
        idx = torch.randint(0, len(pixels), (64,), generator=generator)
        features = tower(pixel_values=pixels[idx], output_hidden_states=True).hidden_states[layer][:, 1:].mean(1)
        loss = sum(torch.nn.functional.cross_entropy(head(features), targets[idx, k]) for k, head in enumerate(heads))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tower.eval()


def resolve_tiny(spec: str, cache_dir: str | Path | None = None) -> Path:
    """Turn `tiny://<text_model>` into a built directory, building it once (atomically) if needed."""
    text_model = spec.removeprefix(TINY_SCHEME) or "llama"
    key = hashlib.sha256(json.dumps([BUILD_VERSION, text_model]).encode()).hexdigest()[:10]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "backbones"
    target = root / f"tiny-{text_model}-{key}"
    return build_once(target, lambda out: build_tiny_backbone(out, text_model=text_model))


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Build into a temporary sibling and rename it to `target` (atomic): concurrent processes
    (DDP ranks, parallel tests) never see a half-written directory; the loser of a race keeps the winner's."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
