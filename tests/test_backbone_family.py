"""A third backbone family, added from this file alone: LLaVA-NeXT (anyres tiles, `image_sizes`, a learned
`image_newline`), as a newcomer would add one: an adapter (backbones/adapter.py's protocol), a tiny model built
from config and saved, a config (here: the module's arguments). No library file names it; through the adapter it
loads with from_pretrained, scores in every mode to the log-probs of each view alone, trains with LoRA on the
language model only, and its FSDP2 units are its own layer classes."""

from __future__ import annotations

import dataclasses

import lightning as L
import pytest
import torch
from PIL import Image
from test_policy import check_every_mode, encode
from torch import nn

from lightning_meddpo.backbones import adapter as adapters
from lightning_meddpo.backbones.adapter import Backbone, adapter_for, register
from lightning_meddpo.backbones.loader import load_model, load_processor
from lightning_meddpo.backbones.templates import get_chat_template
from lightning_meddpo.data.records import read_preference_file

GRID = [[32, 32], [32, 64], [64, 32]]  # anyres: an image is tiled at the best of these, plus a 32 px overview


class LlavaNextBackbone(Backbone):
    """The whole adapter: where the parts are, what the image encoder takes besides pixels, and the projector's
    learned row separator (`image_newline`, a parameter of the model, not of a module)."""

    name = "llava_next"
    model_types = ("llava_next",)
    vision_tower = "vision_tower"
    projector = "multi_modal_projector"
    image_inputs = ("image_sizes",)
    image_token = "<image>"

    def part_parameters(self, model: nn.Module, part: str) -> list[nn.Parameter]:
        params = super().part_parameters(model, part)
        return params + [self.core(model).image_newline] if part == "projector" else params


def build_tiny_llava_next(out, corpus: list[str]):
    """A tiny LLaVA-NeXT (CLIP 32 px tiles + Llama), its processor, saved for from_pretrained."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from lightning_meddpo.demo.tiny import train_tokenizer

    tokenizer = train_tokenizer(corpus)
    images = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                        image_grid_pinpoints=GRID)
    processor = LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=16,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=get_chat_template("tiny"))
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=32, patch_size=16, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                                tie_word_embeddings=False),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=GRID,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory):
    """The family registered for this module's tests only."""
    from lightning_meddpo.demo.synthetic import demo_corpus

    added = register(LlavaNextBackbone())
    try:
        yield build_tiny_llava_next(tmp_path_factory.mktemp("llava_next"), demo_corpus())
    finally:
        adapters.ADAPTERS.remove(added)


def test_a_new_family_scores_every_view_as_alone_with_images_of_different_tile_counts(llava_next, demo_dir):
    processor = load_processor(str(llava_next))
    model = load_model(str(llava_next))
    assert isinstance(adapter_for(model), LlavaNextBackbone)
    records, _ = read_preference_file(demo_dir / "train.json")
    sizes = [(32, 32), (64, 30), (30, 64)]  # 2, 3 and 3 tiles; m' of another size again
    records = [dataclasses.replace(r, image=Image.open(r.image).convert("RGB").resize(size),
                                   rejected_image=Image.open(r.image).convert("RGB").resize(size[::-1]).rotate(90))
               for r, size in zip(records, sizes)]
    batch = encode(records, processor)
    assert batch.images.pixel_values.shape[1] == 3 and "image_sizes" in batch.images.extra  # padded to the most tiles
    logps = check_every_mode(model, batch)  # packed, rows and the model's own forward: each view as if alone
    assert not torch.allclose(logps["chosen"], logps["chosen_mprime"])


def test_a_new_family_trains_with_lora_and_shards_its_own_layers(llava_next, demo_dir):
    from lightning_meddpo.data.datamodule import PreferenceDataModule
    from lightning_meddpo.modules import DPO

    module = DPO(backbone=str(llava_next), lora={"r": 4, "alpha": 8}, lr=1e-3)
    dm = PreferenceDataModule(str(demo_dir / "train.json"), str(demo_dir / "val.json"), batch_size=4, max_length=128,
                              processor=module.processor)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    model = module.policy.model
    adapter = adapter_for(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n and "language_model" in n for n in trained)  # LoRA excludes the vision side
    assert module.policy.shares_image_features  # tower, projector and image_newline frozen: the reference reuses
    assert module.policy.mode_for(model) == "packed"
    assert adapter.layer_classes(model) >= {"LlamaDecoderLayer", "CLIPEncoderLayer"}
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
