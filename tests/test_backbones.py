"""The tiny backbone and the loader: built from config, saved, reloaded through from_pretrained."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lightning_meddpo.backbones.loader import load_model, load_processor
from lightning_meddpo.demo.tiny import build_tiny_backbone, resolve_tiny
from lightning_meddpo.modules import DPO


@pytest.mark.parametrize("text_model", ["llama", "mistral", "qwen2"])
def test_tiny_backbone_round_trips_through_from_pretrained(tmp_path, text_model):
    path = build_tiny_backbone(tmp_path / text_model, text_model=text_model, corpus=["Is there a lesion in the left lung?"] * 5)
    model, processor = load_model(str(path)), load_processor(str(path))
    assert model.config.text_config.model_type == text_model
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"
    prompt = processor.apply_chat_template([{"role": "user", "content": "<image>\nIs there a lesion?"}], add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[Image.new("RGB", (50, 40), (200, 10, 10))], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == model.config.image_seq_length
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_tiny_scheme_builds_once_and_is_deterministic(tmp_path):
    first = resolve_tiny("tiny://llama", cache_dir=tmp_path)
    stamp = (first / "config.json").stat().st_mtime_ns
    assert resolve_tiny("tiny://llama", cache_dir=tmp_path) == first and (first / "config.json").stat().st_mtime_ns == stamp
    other = build_tiny_backbone(tmp_path / "again", text_model="llama")
    a, b = load_model(str(first)).state_dict(), load_model(str(other)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same weights


def test_module_takes_an_hf_directory_as_backbone(tmp_path):
    path = build_tiny_backbone(tmp_path / "hf", text_model="mistral")
    module = DPO(backbone=str(path))
    module.configure_model()
    assert module.policy.model.config.text_config.model_type == "mistral"
    assert module.processor.tokenizer.convert_tokens_to_ids("<image>") == module.policy.model.config.image_token_id


def test_missing_backbone_is_a_clear_error(tmp_path):
    with pytest.raises(OSError):
        load_processor(str(tmp_path / "does-not-exist"))
