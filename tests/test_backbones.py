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


def test_a_checkpoint_without_a_chat_template_gets_its_familys_default(tmp_path):
    """Qwen-VL's adapter names ChatML; a LLaVA has none to assume (its text model decides), so naming one is asked."""
    import json
    import shutil

    from lightning_meddpo.backbones.loader import resolve_backbone
    from lightning_meddpo.backbones.templates import get_chat_template

    for name in ("tiny://qwen2_vl", "tiny://llama"):
        bare = tmp_path / name.removeprefix("tiny://")
        shutil.copytree(resolve_backbone(name), bare)
        (bare / "chat_template.jinja").unlink(missing_ok=True)
        for f in bare.glob("*.json"):
            text = f.read_text()
            if '"chat_template"' in text:
                data = json.loads(text)
                data.pop("chat_template", None)
                f.write_text(json.dumps(data))
    processor = load_processor(str(tmp_path / "qwen2_vl"))
    assert processor.tokenizer.chat_template == get_chat_template("qwen2_vl")
    with pytest.raises(ValueError, match="has no chat template; set `chat_template`"):
        load_processor(str(tmp_path / "llama"))
