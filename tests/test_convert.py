"""Conversion of original-LLaVA-layout checkpoints: logits equal a hand-built composition of the parts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lightning_meddpo.backbones.templates import get_chat_template
from lightning_meddpo.commands.convert import (
    ConversionError,
    convert_llava_checkpoint,
    expand_to_square,
)
from tests.conftest import run_program

HIDDEN = 32
VISION = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              image_size=28, patch_size=14, projection_dim=16)
N_PATCHES = (28 // 14) ** 2


def make_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = ["USER: what is shown in the image? ASSISTANT: a chest x-ray with no effusion"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    return fast


class Parts:
    """The pieces of a tiny LLaVA: language model, CLIP tower, mlp2x_gelu projector."""

    def __init__(self, text: str, vocab: int):
        torch.manual_seed(0)
        common = dict(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
        if text == "mistral":
            self.text_config = MistralConfig(**common)
            self.lm = MistralForCausalLM(self.text_config).eval()
            self.arch, self.model_type = "LlavaMistralForCausalLM", "llava_mistral"
        else:
            self.text_config = Qwen2Config(**common)
            self.lm = Qwen2ForCausalLM(self.text_config).eval()
            self.arch, self.model_type = "LlavaQwen2ForCausalLM", "llava_qwen2"
        self.clip = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
        self.proj = torch.nn.Sequential(torch.nn.Linear(24, HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, HIDDEN))

    def original_state_dict(self, with_vision: bool,
                            vision_prefix: str = "model.vision_tower.vision_tower.vision_model.") -> dict[str, torch.Tensor]:
        sd = {k: v.clone() for k, v in self.lm.state_dict().items()}  # model.layers.*, model.embed_tokens, lm_head
        sd.update({f"model.mm_projector.{k}": v.clone() for k, v in self.proj.state_dict().items()})
        if with_vision:
            sd.update({f"{vision_prefix}{k}": v.clone() for k, v in self.clip.state_dict().items()})
        # an old checkpoint's persistent buffer, recomputed by current modules: dropped silently
        sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)
        return sd

    @torch.no_grad()
    def reference_logits(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_id: int) -> torch.Tensor:
        """CLIP layer -2 without CLS -> Linear-GELU-Linear -> at the placeholders -> LM on inputs_embeds."""
        hidden = self.clip(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        feats = self.proj(hidden)
        mask = input_ids == image_id
        embeds = self.lm.get_input_embeddings()(input_ids.masked_fill(mask, 0))
        embeds[mask] = feats.reshape(-1, HIDDEN)
        return self.lm(inputs_embeds=embeds).logits


def write_original(parts: Parts, path: Path, *, fmt: str = "safetensors", with_vision: bool = True,
                   vision_tower: str | None = None, extra: dict | None = None,
                   drop: tuple[str, ...] = (), vision_prefix: str = "model.vision_tower.vision_tower.vision_model.",
                   ) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if vision_tower is None:  # a local CLIP directory with the same tower, as mm_vision_tower
        parts.clip.save_pretrained(path.parent / "clip")
        vision_tower = str(path.parent / "clip")
    tok = make_tokenizer(path)
    sd = parts.original_state_dict(with_vision, vision_prefix)
    sd.update(extra or {})
    for k in drop:
        sd.pop(k)
    keys = sorted(sd)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, half in enumerate(halves, start=1):
        if fmt == "safetensors":
            name = f"model-0000{i}-of-00002.safetensors"
            save_file({k: sd[k].contiguous() for k in half}, str(path / name), metadata={"format": "pt"})
        else:
            name = f"pytorch_model-0000{i}-of-00002.bin"
            torch.save({k: sd[k] for k in half}, path / name)
        weight_map.update({k: name for k in half})
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (path / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = parts.text_config.to_dict()
    cfg.update(architectures=[parts.arch], model_type=parts.model_type, mm_vision_tower=vision_tower,
               mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
               mm_hidden_size=24, image_aspect_ratio="pad", mm_use_im_start_end=False, mm_use_im_patch_token=False,
               tune_mm_mlp_adapter=False, use_mm_proj=True, tokenizer_model_max_length=2048,
               tokenizer_padding_side="right", torch_dtype="float32")
    (path / "config.json").write_text(json.dumps(cfg))
    assert len(tok) <= parts.text_config.vocab_size
    return path


def tokenizer_vocab(tmp_path: Path) -> int:
    return len(make_tokenizer(tmp_path / "probe"))


def check_logits(parts: Parts, out: Path, report) -> None:
    model, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    model.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.config.text_config.model_type == parts.text_config.model_type
    text_keys = model.config.text_config.to_dict()
    assert not [k for k in text_keys if "mm_" in k or k in ("image_aspect_ratio", "tokenizer_padding_side")]
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"
    assert model.config.projector_hidden_act == "gelu"
    assert model.config.image_seq_length == N_PATCHES
    image_id = model.config.image_token_id
    n_tok = report.image_token_id  # appended to the tokenizer: its id is the old tokenizer length
    assert image_id == n_tok and n_tok <= parts.text_config.vocab_size
    # embeddings grow only when the new id does not fit in the existing rows (Qwen2 has spare rows)
    assert model.get_input_embeddings().weight.shape[0] == max(parts.text_config.vocab_size, n_tok + 1)
    torch.manual_seed(1)
    pixel_values = torch.randn(1, 3, 28, 28)
    ids = torch.tensor([[1, 5, 7, 9] + [image_id] * N_PATCHES + [11, 13, 6, 8]])
    with torch.no_grad():
        got = model(input_ids=ids, pixel_values=pixel_values).logits[..., : parts.text_config.vocab_size]
    ref = parts.reference_logits(ids, pixel_values, image_id)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "text,fmt,spare_rows",
    [("mistral", "safetensors", 0), ("mistral", "bin", 0), ("qwen2", "safetensors", 0), ("qwen2", "bin", 8)],
)
def test_converted_logits_equal_composition_of_parts(tmp_path, text, fmt, spare_rows):
    parts = Parts(text, tokenizer_vocab(tmp_path) + spare_rows)
    src = write_original(parts, tmp_path / "src", fmt=fmt)
    report = convert_llava_checkpoint(src, tmp_path / "out")
    # LLaVA-Med's loader reads the tower from mm_vision_tower; HuatuoGPT-Vision's from the checkpoint
    expected = str(tmp_path / "clip") if text == "mistral" else "checkpoint"
    assert report.added_image_token and report.vision_from.startswith(expected)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    # streamed: one output shard per source shard
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    check_logits(parts, tmp_path / "out", report)


def test_vision_weights_from_separate_clip_dir(tmp_path):
    parts = Parts("mistral", tokenizer_vocab(tmp_path))
    clip_dir = tmp_path / "clip"
    parts.clip.save_pretrained(clip_dir)
    CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(clip_dir)
    src = write_original(parts, tmp_path / "src", with_vision=False, vision_tower=str(clip_dir))
    report = convert_llava_checkpoint(src, tmp_path / "out")  # mm_vision_tower names the local directory
    assert report.vision_from == str(clip_dir)
    check_logits(parts, tmp_path / "out", report)


def test_clip_dir_with_vision_model_prefix_and_text_tower(tmp_path):
    """A full-CLIP-style directory (vision_model.* plus text/projection weights) passed explicitly."""
    parts = Parts("mistral", tokenizer_vocab(tmp_path))
    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    parts.clip.config.save_pretrained(clip_dir)
    sd = {f"vision_model.{k}": v for k, v in parts.clip.state_dict().items()}
    sd["text_model.embeddings.token_embedding.weight"] = torch.zeros(10, 8)
    sd["visual_projection.weight"] = torch.zeros(16, 24)
    sd["logit_scale"] = torch.zeros(())
    save_file(sd, str(clip_dir / "model.safetensors"))
    src = write_original(parts, tmp_path / "src", with_vision=False, vision_tower="openai/not-here")
    report = convert_llava_checkpoint(src, tmp_path / "out", vision_tower_dir=clip_dir)
    check_logits(parts, tmp_path / "out", report)


def test_processor_pads_to_square_in_mean_colour_and_expands_image_tokens(tmp_path):
    parts = Parts("mistral", tokenizer_vocab(tmp_path))
    src = write_original(parts, tmp_path / "src")
    convert_llava_checkpoint(src, tmp_path / "out", chat_template="mistral_instruct")
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    assert processor.chat_template == get_chat_template("mistral_instruct")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (20, 44, 3), dtype=np.uint8))  # wide: padded top and bottom
    batch = processor(text="<image>\nWhat is shown?", images=image, return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"] == image_id).sum()) == N_PATCHES
    mean = processor.image_processor.image_mean
    padded = expand_to_square(image, tuple(int(x * 255) for x in mean))
    assert padded.size == (44, 44)
    assert padded.getpixel((0, 0)) == tuple(int(x * 255) for x in mean)
    assert padded.getpixel((10, 12)) == image.getpixel((10, 0))  # offset (44 - 20) // 2 = 12
    clip = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                 image_mean=mean, image_std=processor.image_processor.image_std)
    want = clip(images=padded, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch["pixel_values"], want)
    # and the whole pipeline runs: processor output -> converted model
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert model(**batch).logits.shape[1] == batch["input_ids"].shape[1]


def test_expand_to_square_tall_and_square():
    tall = Image.new("RGB", (3, 7), (255, 0, 0))
    out = expand_to_square(tall, (1, 2, 3))
    assert out.size == (7, 7) and out.getpixel((0, 0)) == (1, 2, 3) and out.getpixel((2, 3)) == (255, 0, 0)
    sq = Image.new("RGB", (5, 5))
    assert expand_to_square(sq, (0, 0, 0)) is sq


def test_unexpected_and_missing_keys_are_listed(tmp_path):
    parts = Parts("mistral", tokenizer_vocab(tmp_path))
    src = write_original(parts, tmp_path / "src", extra={"model.mm_projector.4.weight": torch.zeros(2, 2)},
                         drop=("model.layers.1.mlp.up_proj.weight",))
    with pytest.raises(ConversionError) as e:
        convert_llava_checkpoint(src, tmp_path / "out")
    msg = str(e.value)
    assert "model.mm_projector.4.weight" in msg and "unexpected" in msg
    assert "model.layers.1.mlp.up_proj.weight (-> model.language_model.layers.1.mlp.up_proj.weight)" in msg
    assert "missing keys (1)" in msg
    assert not (tmp_path / "out").exists()  # nothing written
    with pytest.raises(ConversionError, match="must differ"):
        convert_llava_checkpoint(src, src)


def test_missing_vision_tower_is_an_error(tmp_path):
    parts = Parts("mistral", tokenizer_vocab(tmp_path))
    src = write_original(parts, tmp_path / "src", with_vision=False, vision_tower="someone/unknown-clip")
    with pytest.raises(ConversionError, match="vision_tower_dir"):
        convert_llava_checkpoint(src, tmp_path / "out")
    # a CLIP directory with a config but no weights, and no tower weights in the checkpoint either
    parts.clip.config.save_pretrained(tmp_path / "clip_config_only")
    with pytest.raises(ConversionError, match="no weights found"):
        convert_llava_checkpoint(src, tmp_path / "out", vision_tower_dir=tmp_path / "clip_config_only")


def test_main_cli(tmp_path, capsys):
    parts = Parts("qwen2", tokenizer_vocab(tmp_path))
    src = write_original(parts, tmp_path / "src")
    args = ["--src", str(src), "--out", str(tmp_path / "out"), "--dtype", "bfloat16", "--pad-vocab-to-multiple-of", "64"]
    assert Path(run_program("convert", args).out_dir) == tmp_path / "out"
    assert '"image_token_id"' in capsys.readouterr().out
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert model.config.text_config.model_type == "qwen2"
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.get_input_embeddings().weight.shape[0] == 128 == model.config.text_config.vocab_size
    assert model.get_output_embeddings().weight.shape[0] == 128
    with pytest.raises(SystemExit):
        run_program("convert", ["--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")])


def test_vision_tower_key_variants(tmp_path):
    """Some LLaVA derivatives store the tower as vision_model.* at top level."""
    parts = Parts("qwen2", tokenizer_vocab(tmp_path))
    src = write_original(parts, tmp_path / "src", vision_prefix="vision_model.")
    report = convert_llava_checkpoint(src, tmp_path / "out")
    assert report.vision_from == "checkpoint"
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in report.ignored_keys
    check_logits(parts, tmp_path / "out", report)


def test_unsupported_llava_settings_are_named(tmp_path):
    parts = Parts("mistral", tokenizer_vocab(tmp_path))
    src = write_original(parts, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(mm_projector_type="linear", image_aspect_ratio="anyres")
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="mm_projector_type='linear'.*image_aspect_ratio='anyres'"):
        convert_llava_checkpoint(src, tmp_path / "out")


@pytest.mark.parametrize("text", ["mistral", "qwen2"])
def test_vision_tower_source_follows_the_original_loader(tmp_path, text):
    """The checkpoint's stored tower differs from the CLIP directory's. LLaVA-Med's loader (llava_mistral)
    ignores the stored copy and loads mm_vision_tower; HuatuoGPT-Vision's lets the checkpoint's copy win.
    The converted model gives the logits of the tower the original code runs; `vision_source` overrides."""
    parts = Parts(text, tokenizer_vocab(tmp_path))
    clip_dir = tmp_path / "clip_dir"
    other = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()  # another tower, in the CLIP directory
    other.save_pretrained(clip_dir)
    src = write_original(parts, tmp_path / "src", vision_tower=str(clip_dir))  # parts.clip stored in the checkpoint
    report = convert_llava_checkpoint(src, tmp_path / "auto")
    runs_clip_dir = text == "mistral"
    assert report.vision_from.startswith(str(clip_dir) if runs_clip_dir else "checkpoint")
    if runs_clip_dir:
        assert "ignored, as the original loader does" in report.vision_from
        assert any(k.startswith("model.vision_tower.vision_tower.") for k in report.ignored_keys)
    stored = parts.clip
    parts.clip = other if runs_clip_dir else stored
    check_logits(parts, tmp_path / "auto", report)
    forced = "checkpoint" if runs_clip_dir else "clip"
    report = convert_llava_checkpoint(src, tmp_path / "forced", vision_source=forced)
    parts.clip = stored if runs_clip_dir else other
    check_logits(parts, tmp_path / "forced", report)


def test_llava_med_without_a_local_clip_directory_says_what_to_pass(tmp_path):
    parts = Parts("mistral", tokenizer_vocab(tmp_path))
    src = write_original(parts, tmp_path / "src", vision_tower="openai/clip-vit-large-patch14")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "mm_hidden_size": None}))  # the tower's config is known
    with pytest.raises(ConversionError, match="--vision-tower-dir.*--vision-source checkpoint"):
        convert_llava_checkpoint(src, tmp_path / "out")


def test_text_config_keeps_no_original_only_fields_and_output_names_no_empty_type(tmp_path, capfd):
    parts = Parts("mistral", tokenizer_vocab(tmp_path))
    src = write_original(parts, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(feature_outs="encoder+decoder", segtok_posembed="sincos", proj_vis_to_txt_tokens=False, rope_theta=1e6)
    (src / "config.json").write_text(json.dumps(cfg))
    run_program("convert", ["--src", str(src), "--out", str(tmp_path / "out")])
    text = json.loads((tmp_path / "out" / "config.json").read_text())["text_config"]
    assert not {"feature_outs", "segtok_posembed", "proj_vis_to_txt_tokens"} & set(text)
    assert text["rope_parameters"]["rope_theta"] == 1e6  # a legacy field the text config understands is kept
    printed = capfd.readouterr()
    assert "model of type ``" not in printed.out + printed.err
