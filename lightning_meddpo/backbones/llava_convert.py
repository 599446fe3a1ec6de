"""Convert an original-LLaVA-layout checkpoint into a transformers `LlavaForConditionalGeneration` directory.

The released LLaVA-Med v1.5 (`LlavaMistralForCausalLM`) and HuatuoGPT-Vision-7B (`LlavaQwen2ForCausalLM`)
checkpoints use the layout of haotian-liu/LLaVA (`llava/model/llava_arch.py`):

    model.embed_tokens / model.layers.* / model.norm / lm_head         the language model
    model.mm_projector.0.* , model.mm_projector.2.*                    "mlp2x_gelu": Linear-GELU-Linear
    model.vision_tower.vision_tower.vision_model.*                     the CLIP tower (may be absent:
                                                                       then it comes from the CLIP
                                                                       directory named by mm_vision_tower)

with config fields mm_vision_tower, mm_projector_type, mm_vision_select_layer (-2), mm_vision_select_feature
("patch": drop CLS), mm_hidden_size and image_aspect_ratio ("pad": pad to square in the mean colour).

The output is what `LlavaForConditionalGeneration.from_pretrained` / `AutoProcessor.from_pretrained` read:
LlavaConfig (text_config mistral / qwen2 / llama, CLIP vision_config, vision_feature_layer = select_layer,
strategy "default" for "patch"), safetensors shards plus index, and a LlavaProcessor whose image processor is
`LlavaImageProcessorPil` with `do_pad=True` when image_aspect_ratio is "pad".

Pad to square: transformers' CLIP image processor (`CLIPImageProcessorPil`) has no pad option;
`LlavaImageProcessor(Pil)` has `do_pad`, which pads the image to a square with background
`tuple(int(x*255) for x in image_mean)` and the image centred (offset (long-short)//2): the same as LLaVA's
`expand2square`. We use it, and also export `expand_to_square(image, background_rgb)` for loaders that
preprocess with a plain CLIP processor.

Memory: tensors are read one source shard at a time (safetensors via `safe_open`, .bin via
`torch.load(mmap=True)`) and each output shard is written before the next source shard is read. Key names
and shapes are checked against the target model (built on the meta device) before anything is written;
missing, unexpected or mis-shaped keys raise `ConversionError` listing them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:  # torch is imported where it is used: --help starts without it (entry.py)
    import torch

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"

# LLaVA's constants: OPENAI_CLIP_MEAN / STD (the CLIP preprocessing LLaVA uses).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Known CLIP towers, so a checkpoint that carries the tower weights converts without the CLIP directory.
KNOWN_VISION_TOWERS: dict[str, dict] = {
    "openai/clip-vit-large-patch14-336": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    ),
    "openai/clip-vit-large-patch14": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    ),
}

_ARCH_TO_TEXT_TYPE = {
    "LlavaMistralForCausalLM": "mistral",
    "LlavaQwen2ForCausalLM": "qwen2",
    "LlavaQwenForCausalLM": "qwen2",
    "LlavaLlamaForCausalLM": "llama",
}
_MODEL_TYPE_TO_TEXT_TYPE = {"llava_mistral": "mistral", "llava_qwen2": "qwen2", "llava_qwen": "qwen2",
                            "llava_llama": "llama", "llava": "llama"}
# Default chat template per text model (names in backbones/templates.py).
DEFAULT_TEMPLATE = {"mistral": "mistral_instruct", "qwen2": "qwen_2", "llama": "v1"}

# Source config keys that belong to LLaVA, not to the language model config.
_LLAVA_ONLY_KEYS = {
    "architectures", "model_type", "_name_or_path", "transformers_version", "image_aspect_ratio",
    "image_grid_pinpoints", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "use_mm_proj",
    "tokenizer_model_max_length", "tokenizer_padding_side", "unfreeze_mm_vision_tower", "mm_tunable_parts",
    "image_crop_resolution", "image_split_resolution", "vision_tower", "mm_hidden_size",
    "freeze_mm_vision_resampler", "tune_mm_vision_resampler", "unfreeze_mm_vision_resampler",
}
# Buffers that old checkpoints saved and current modules recompute: dropped, not reported.
_IGNORED_SUFFIXES = (".position_ids", "rotary_emb.inv_freq")
# Parts of a full CLIPModel directory that the vision tower does not use.
_CLIP_UNUSED_PREFIXES = ("text_model.", "visual_projection.", "text_projection.", "logit_scale")


class ConversionError(ValueError):
    """The source checkpoint does not match the target model; the message lists every offending key."""


def expand_to_square(image: Image.Image, background_rgb: Sequence[int]) -> Image.Image:
    """LLaVA's `expand2square`: pad to a square with `background_rgb`, the image centred on the long side.

    `background_rgb` is usually `tuple(int(x * 255) for x in image_processor.image_mean)`.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), tuple(int(c) for c in background_rgb))
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class _Source:
    """The weight files of one checkpoint directory: shard paths and, per key, the shard holding it."""

    directory: Path
    shards: list[Path]
    key_to_shard: dict[str, Path] = field(default_factory=dict)

    @property
    def is_safetensors(self) -> bool:
        return self.shards[0].suffix == ".safetensors"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path}: not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON: {e}") from e


def _find_source(directory: Path) -> _Source:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index}: no 'weight_map' object")
            shards = sorted({directory / f for f in weight_map.values()})
            missing = [str(s) for s in shards if not s.is_file()]
            if missing:
                raise ConversionError(f"{index}: shards named in the index are missing: {missing}")
            return _Source(directory, shards, {k: directory / f for k, f in weight_map.items()})
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (directory / single).is_file():
            return _Source(directory, [directory / single])
    raise ConversionError(
        f"{directory}: no weights found (expected model.safetensors[.index.json] or pytorch_model.bin[.index.json])"
    )


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A .bin shard, memory-mapped when it is in torch's zip format (the default since torch 1.6)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def _shard_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of one shard, reading only the header (safetensors) or a memory map (.bin)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    sd = _load_bin(path)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    del sd
    return shapes


def _iter_shard(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the tensors of one shard, one at a time."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                yield k, f.get_tensor(k)
    else:
        sd = _load_bin(path)
        for k in list(sd):
            yield k, sd.pop(k)


# ---------------------------------------------------------------------------------------------- configs


def _text_model_type(src_cfg: dict) -> str:
    for arch in src_cfg.get("architectures") or []:
        if arch in _ARCH_TO_TEXT_TYPE:
            return _ARCH_TO_TEXT_TYPE[arch]
    mt = src_cfg.get("model_type", "")
    if mt in _MODEL_TYPE_TO_TEXT_TYPE:
        return _MODEL_TYPE_TO_TEXT_TYPE[mt]
    raise ConversionError(
        f"config.json: architectures={src_cfg.get('architectures')} model_type={mt!r}: expected one of "
        f"{sorted(_ARCH_TO_TEXT_TYPE)} (or model_type in {sorted(_MODEL_TYPE_TO_TEXT_TYPE)})"
    )


def _text_config(src_cfg: dict, model_type: str):
    from transformers import CONFIG_MAPPING

    def llava_only(k: str) -> bool:
        return "mm_" in k or k in _LLAVA_ONLY_KEYS or k.startswith("s2")

    cls = CONFIG_MAPPING[model_type]
    config = cls(**{k: v for k, v in src_cfg.items() if not llava_only(k)})
    # Fields the text model class does not know (LLaVA-Med's feature_outs, segtok_posembed, ...) would be
    # saved into text_config as dead attributes: left out. Legacy fields it converts (rope_theta) are kept.
    unknown = sorted(set(config.to_dict()) - set(cls().to_dict()))
    for key in unknown:
        delattr(config, key)
    dropped = sorted(k for k in src_cfg if llava_only(k)) + unknown
    log.info("config.json: fields not carried into text_config (LLaVA's, or unknown to %s): %s", cls.__name__, dropped)
    return config


def _check_llava_fields(src_cfg: dict) -> None:
    problems = []
    if src_cfg.get("mm_projector_type", "linear") != "mlp2x_gelu":
        problems.append(f"mm_projector_type={src_cfg.get('mm_projector_type')!r} (only 'mlp2x_gelu' maps onto "
                        "LlavaMultiModalProjector)")
    if src_cfg.get("mm_vision_select_feature", "patch") not in ("patch", "cls_patch"):
        problems.append(f"mm_vision_select_feature={src_cfg.get('mm_vision_select_feature')!r} "
                        "(expected 'patch' or 'cls_patch')")
    if src_cfg.get("image_aspect_ratio", "pad") not in ("pad", "square", None):
        problems.append(f"image_aspect_ratio={src_cfg.get('image_aspect_ratio')!r} (anyres is LLaVA-NeXT, "
                        "not LlavaForConditionalGeneration; expected 'pad' or 'square')")
    if str(src_cfg.get("mm_patch_merge_type", "flat")) != "flat":
        problems.append(f"mm_patch_merge_type={src_cfg.get('mm_patch_merge_type')!r} (only 'flat')")
    if src_cfg.get("mm_use_im_start_end"):
        problems.append("mm_use_im_start_end=true (image start/end tokens are not supported)")
    if problems:
        raise ConversionError("config.json: unsupported LLaVA settings: " + "; ".join(problems))


# Whose vision tower the original loader uses (`vision_source: auto`):
# - LLaVA-Med (microsoft/LLaVA-Med, `LlavaMistralForCausalLM`): the tower is built with delay_load, so the
#   checkpoint's model.vision_tower.* weights are unexpected keys, dropped by from_pretrained; builder.py then
#   loads CLIPVisionModel from mm_vision_tower. The CLIP directory's tower is the one that runs.
# - HuatuoGPT-Vision (FreedomIntelligence/HuatuoGPT-Vision cli.py, `LlavaQwen2ForCausalLM` /
#   `LlavaLlamaForCausalLM`): init_vision_encoder_from_ckpt=True, then the tower is loaded again from the
#   checkpoint directory itself: the checkpoint's copy wins.
CLIP_DIRECTORY_ARCHS = {"LlavaMistralForCausalLM"}
CLIP_DIRECTORY_TYPES = {"llava_mistral"}


def original_vision_source(src_cfg: dict) -> str:
    """"clip" or "checkpoint": where the model's original loader takes the vision tower from."""
    archs = set(src_cfg.get("architectures") or [])
    return "clip" if archs & CLIP_DIRECTORY_ARCHS or src_cfg.get("model_type") in CLIP_DIRECTORY_TYPES else "checkpoint"


def _vision_dir(src_cfg: dict, vision_tower_dir: str | os.PathLike | None) -> Path | None:
    if vision_tower_dir is not None:
        return Path(vision_tower_dir)
    name = src_cfg.get("mm_vision_tower") or src_cfg.get("vision_tower")
    if name and Path(name).is_dir():
        return Path(name)
    return None


def _vision_config(src_cfg: dict, vdir: Path | None):
    from transformers import CLIPConfig, CLIPVisionConfig

    if vdir is not None:
        cfg = _read_json(vdir / "config.json")
        if cfg.get("model_type") == "clip":
            return CLIPConfig.from_pretrained(vdir).vision_config
        return CLIPVisionConfig.from_pretrained(vdir)
    name = src_cfg.get("mm_vision_tower") or src_cfg.get("vision_tower")
    if name in KNOWN_VISION_TOWERS:
        return CLIPVisionConfig(**KNOWN_VISION_TOWERS[name])
    raise ConversionError(
        f"config.json: mm_vision_tower={name!r} is neither a local directory nor a known tower "
        f"({sorted(KNOWN_VISION_TOWERS)}); pass vision_tower_dir (--vision-tower-dir) naming the CLIP directory"
    )


# ---------------------------------------------------------------------------------------------- key mapping

_LLAVA_VISION_PREFIXES = ("model.vision_tower.vision_tower.", "model.vision_tower.", "vision_tower.", "vision_model.")


def _map_llava_key(key: str) -> str | None:
    """Original-LLaVA key -> our runtime key (`LlavaForConditionalGeneration.state_dict()` names)."""
    if key.startswith("model.mm_projector.0."):
        return "model.multi_modal_projector.linear_1." + key[len("model.mm_projector.0."):]
    if key.startswith("model.mm_projector.2."):
        return "model.multi_modal_projector.linear_2." + key[len("model.mm_projector.2."):]
    for prefix in _LLAVA_VISION_PREFIXES:  # the tower under model.vision_tower.vision_tower (LLaVA) or variants
        if key.startswith(prefix):
            return _map_clip_key(key if prefix == "vision_model." else key[len(prefix):])
    if key == "lm_head.weight":
        return key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return None


def _map_clip_key(key: str) -> str | None:
    """CLIP (vision) key, with or without the `vision_model.` prefix -> runtime key; None if not used."""
    if key.startswith(_CLIP_UNUSED_PREFIXES):
        return None
    if key.startswith("vision_model."):
        key = key[len("vision_model."):]
    return "model.vision_tower." + key


def _source_name(runtime_key: str, vision_in_checkpoint: bool) -> str:
    """For error messages: the original-LLaVA name a missing runtime key would have had."""
    k = runtime_key
    if k.startswith("model.multi_modal_projector.linear_"):
        idx = {"1": "0", "2": "2"}[k[len("model.multi_modal_projector.linear_")]]
        src = f"model.mm_projector.{idx}." + k.split(".", 3)[3]
    elif k.startswith("model.vision_tower."):
        rest = k[len("model.vision_tower."):]
        src = ("model.vision_tower.vision_tower.vision_model." if vision_in_checkpoint else "vision_model.") + rest
    elif k.startswith("model.language_model."):
        src = "model." + k[len("model.language_model."):]
    else:
        src = k
    return src if src == k else f"{src} (-> {k})"


def _is_ignored(key: str) -> bool:
    return key.endswith(_IGNORED_SUFFIXES)


def _disk_names(meta_model) -> dict[str, str]:
    """Runtime key -> the key `save_pretrained` writes (transformers reverts its loading renames on save)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # older/newer layout: runtime names also load
        return {k: k for k in meta_model.state_dict()}
    out = {}
    for k, t in meta_model.state_dict().items():
        names = list(revert_weight_conversion(meta_model, {k: t}))
        out[k] = names[0] if len(names) == 1 else k
    return out


# ---------------------------------------------------------------------------------------------- conversion


@dataclass
class ConversionReport:
    out_dir: Path
    text_model_type: str
    image_token_id: int
    image_seq_length: int
    vocab_size: int
    added_image_token: bool
    vision_from: str
    ignored_keys: list[str]


def _load_tokenizer(src: Path):
    """The source tokenizer. AutoTokenizer reads config.json on the way and warns that its llava_* model type
    is unknown to transformers ("... a model of type ``"): expected here, so that warning is silenced."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(src)
    finally:
        hf_logging.set_verbosity(level)


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Append rows initialised to the mean of the existing rows (the image token's row is never read as an
    input embedding, since image features replace it; its lm_head row gets an average logit)."""
    import torch

    if weight.shape[0] >= rows:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)], dim=0)


def convert_llava_checkpoint(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    vision_tower_dir: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    chat_template: str | None = None,
    pad_vocab_to_multiple_of: int | None = None,
    vision_source: str = "auto",
) -> ConversionReport:
    """Convert `src_dir` (original LLaVA layout) into a `LlavaForConditionalGeneration` directory `out_dir`.

    vision_tower_dir: a CLIP directory (CLIPModel or CLIPVisionModel, config.json + weights, optionally
        preprocessor_config.json). Used for the vision config, for the image mean/std and for the tower weights
        when `vision_source` says so (or the checkpoint has none). Defaults to mm_vision_tower if that is a
        local directory.
    dtype: cast floating tensors (e.g. "bfloat16"); default: the source config's torch_dtype, else unchanged.
    chat_template: name in `backbones.templates` (default per text model: mistral -> mistral_instruct,
        qwen2 -> qwen_2, llama -> v1); "none" for no template.
    pad_vocab_to_multiple_of: round the embedding rows up (e.g. 64) after adding the image token.
    vision_source: where the vision tower's weights come from: "auto" follows the model's original loader
        (LLaVA-Med: the CLIP directory of mm_vision_tower / vision_tower_dir, the checkpoint's copy ignored;
        HuatuoGPT-Vision: the checkpoint's copy, else the CLIP directory), "checkpoint" or "clip" force one.
        The report's `vision_from` says which was used.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaImageProcessorPil,
        LlavaProcessor,
    )
    from transformers.tokenization_utils_base import AddedToken

    from lightning_meddpo.backbones.templates import get_chat_template

    src, out = Path(src_dir), Path(out_dir)
    if out.resolve() == src.resolve():
        raise ConversionError(f"{out}: the output directory must differ from the source (shards would be overwritten)")
    if vision_source not in ("auto", "checkpoint", "clip"):
        raise ConversionError(f"vision_source={vision_source!r}: expected auto, checkpoint or clip")
    src_cfg = _read_json(src / "config.json")
    wanted = original_vision_source(src_cfg) if vision_source == "auto" else vision_source
    _check_llava_fields(src_cfg)
    text_type = _text_model_type(src_cfg)
    text_config = _text_config(src_cfg, text_type)
    vdir = _vision_dir(src_cfg, vision_tower_dir)
    vision_config = _vision_config(src_cfg, vdir)
    if src_cfg.get("mm_hidden_size") not in (None, vision_config.hidden_size):
        raise ConversionError(f"config.json: mm_hidden_size={src_cfg['mm_hidden_size']} but the CLIP tower has "
                              f"hidden_size={vision_config.hidden_size}")

    # -- tokenizer: add the image token if missing.
    tokenizer = _load_tokenizer(src)
    added = IMAGE_TOKEN not in tokenizer.get_vocab()
    if added:
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    orig_vocab = text_config.vocab_size
    vocab = max(orig_vocab, len(tokenizer), image_token_id + 1)
    if pad_vocab_to_multiple_of and vocab != orig_vocab:
        vocab = -(-vocab // pad_vocab_to_multiple_of) * pad_vocab_to_multiple_of
    text_config.vocab_size = vocab

    if dtype is None:
        dtype = src_cfg.get("torch_dtype") or src_cfg.get("dtype")
    if dtype == "auto":
        dtype = None
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConversionError(f"dtype={dtype!r}: expected float32, float16 or bfloat16")
        dtype = getattr(torch, dtype)

    strategy = "full" if src_cfg.get("mm_vision_select_feature", "patch") == "cls_patch" else "default"
    n_patches = (vision_config.image_size // vision_config.patch_size) ** 2
    image_seq_length = n_patches + (1 if strategy == "full" else 0)
    config = LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=image_token_id,
        image_seq_length=image_seq_length,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=int(src_cfg.get("mm_vision_select_layer", -2)),
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    if dtype is not None:
        config.dtype = dtype

    # -- the target: key names and shapes from a meta-device model.
    with torch.device("meta"):
        meta = LlavaForConditionalGeneration(config)
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    disk = _disk_names(meta)
    del meta
    resized = {"model.language_model.embed_tokens.weight", "lm_head.weight"}

    # -- plan: (shard, mapping source key -> runtime key), checking names and shapes before writing anything.
    llava = _find_source(src)
    plan: list[tuple[Path, dict[str, str], str]] = []
    seen: dict[str, str] = {}
    unexpected, ignored, bad_shape = [], [], []
    has_vision = False
    skipped_tower = 0
    for shard in llava.shards:
        mapping = {}
        for k, shape in _shard_shapes(shard).items():
            if _is_ignored(k):
                ignored.append(k)
                continue
            tk = _map_llava_key(k)
            if wanted == "clip" and tk is not None and tk.startswith("model.vision_tower."):
                ignored.append(k)  # the original loader never reads the checkpoint's tower
                skipped_tower += 1
                continue
            if tk == "lm_head.weight" and config.tie_word_embeddings:
                ignored.append(k)  # tied to embed_tokens: the saved copy is redundant
                continue
            if tk is None or tk not in expected:
                unexpected.append(f"{shard.name}: {k}" + (f" (-> {tk})" if tk else ""))
                continue
            want = expected[tk]
            if shape != want and not (tk in resized and shape == (orig_vocab,) + want[1:]):
                bad_shape.append(f"{shard.name}: {k}: {list(shape)}, expected {list(want)}")
            if tk in seen:
                unexpected.append(f"{shard.name}: {k} (duplicate of {seen[tk]})")
                continue
            has_vision |= tk.startswith("model.vision_tower.")
            mapping[k] = tk
            seen[tk] = k
        plan.append((shard, mapping, "llava"))
    vision_from = "checkpoint"
    if not has_vision:
        if vdir is None:
            why = ("the original loader takes the tower from mm_vision_tower, not from the checkpoint"
                   if skipped_tower else "the checkpoint has no model.vision_tower.* weights")
            raise ConversionError(
                f"{src}: {why}, and no CLIP directory was given (mm_vision_tower={src_cfg.get('mm_vision_tower')!r} "
                "is not a local directory); pass vision_tower_dir (--vision-tower-dir)"
                + ("; or vision_source='checkpoint' (--vision-source checkpoint) to use the checkpoint's copy instead"
                   if skipped_tower else "")
            )
        vision_from = str(vdir) + (f" (the checkpoint's {skipped_tower} vision tower tensors ignored, as the "
                                   "original loader does)" if skipped_tower else "")
        for shard in _find_source(vdir).shards:
            mapping = {}
            for k, shape in _shard_shapes(shard).items():
                tk = _map_clip_key(k)
                if tk is None or _is_ignored(k):
                    continue
                if tk not in expected:
                    unexpected.append(f"{vdir.name}/{shard.name}: {k}")
                    continue
                if shape != expected[tk]:
                    bad_shape.append(f"{vdir.name}/{shard.name}: {k}: {list(shape)}, expected {list(expected[tk])}")
                mapping[k] = tk
                seen[tk] = k
            plan.append((shard, mapping, "clip"))
    missing = sorted(set(expected) - set(seen))
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {[_source_name(k, has_vision) for k in missing]}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if bad_shape:
            parts.append(f"shape mismatches ({len(bad_shape)}): {bad_shape}")
        raise ConversionError(f"cannot convert {src}: " + "; ".join(parts))

    # -- write: one output shard per source shard.
    out.mkdir(parents=True, exist_ok=True)
    plan = [p for p in plan if p[1]]
    n = len(plan)
    weight_map: dict[str, str] = {}
    total = 0
    for i, (shard, mapping, _) in enumerate(plan, start=1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for k, t in _iter_shard(shard):
            tk = mapping.get(k)
            if tk is None:
                continue
            if tk in resized:
                t = _pad_rows(t, vocab)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            t = t.contiguous()
            tensors[disk[tk]] = t
            weight_map[disk[tk]] = name
            total += t.numel() * t.element_size()
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
    )
    config.save_pretrained(out)
    gen = src / "generation_config.json"
    if gen.is_file():
        (out / "generation_config.json").write_text(gen.read_text())

    # -- processor.
    mean, std = CLIP_MEAN, CLIP_STD
    if vdir is not None and (vdir / "preprocessor_config.json").is_file():
        pp = json.loads((vdir / "preprocessor_config.json").read_text())
        mean, std = tuple(pp.get("image_mean", mean)), tuple(pp.get("image_std", std))
    size = vision_config.image_size
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_pad=src_cfg.get("image_aspect_ratio", "pad") == "pad",
        image_mean=list(mean),
        image_std=list(std),
    )
    template_name = chat_template or DEFAULT_TEMPLATE[text_type]
    template = None if template_name == "none" else get_chat_template(template_name)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS
    )
    processor.save_pretrained(out)
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(out)

    report = ConversionReport(
        out_dir=out, text_model_type=text_type, image_token_id=image_token_id, image_seq_length=image_seq_length,
        vocab_size=vocab, added_image_token=added, vision_from=vision_from, ignored_keys=ignored,
    )
    log.info("converted %s -> %s: %s", src, out, report)
    return report
