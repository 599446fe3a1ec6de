"""One adapter per backbone family: what the rest of the tool needs to know about a family's model.

A `Backbone` answers where the family keeps its parts (vision tower, projector, language model, LM head), how
its image encoder is called (which processor outputs it takes), its position ids where they are not 0..n
(Qwen-VL's 3-D rope), the LoRA exclude rule, the layer classes FSDP2 shards, the prompt's image placeholder and
default chat template, weights the forward never uses, and how its processor loads and saves. The policy, the
builder, FSDP2, `plan` and the data layer ask the adapter of a model (`adapter_for`) or of a processor's image
token (`placeholder_for`); nothing outside backbones/ names a family's classes.

Adding a family: a subclass in its own module, `register(...)`-ed (built-ins: llava.py, qwen_vl.py), a tiny demo
model, a config. tests/test_backbone_family.py adds LLaVA-NeXT that way, from the test alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import reduce

from torch import Tensor, nn

from lightning_meddpo.attention import NAME as PREFIX_ATTENTION

FREEZABLE = ("vision_tower", "projector", "language_model")  # the parts `freeze` can name


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (the same object otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class Backbone:
    """A family's answers; the defaults suit transformers' `...ForConditionalGeneration` layout: `.model` holds the
    parts by name, `.lm_head` the head, `.model.get_image_features` encodes images.

    Class attributes say what a family is; methods are overridden only where a family differs."""

    name = "unknown"
    model_types: tuple[str, ...] = ()  # config.model_type values this adapter serves
    vision_tower: str | None = None  # attribute path under `.model`
    projector: str | None = None  # attribute path under `.model` (may sit inside the tower: Qwen-VL's merger)
    language_model: str = "language_model"
    image_inputs: tuple[str, ...] = ()  # processor outputs besides pixel_values that the image encoder takes
    image_token: str | None = None  # the processor's image token, by which a processor is recognised
    image_placeholder: str | None = None  # what a prompt carries for one image (default: the image token)
    chat_template: str | None = None  # our template (backbones/templates.py) for a checkpoint that has none
    published: dict[str, Callable[[], object]] = {}  # released dimensions by name: () -> a transformers config

    @property
    def known(self) -> bool:
        return bool(self.model_types)

    # -- parts ----------------------------------------------------------------------------------
    def core(self, model: nn.Module) -> nn.Module | None:
        return getattr(base_model(model), "model", None)

    def part(self, model: nn.Module, path: str | None) -> nn.Module | None:
        if path is None:
            return None
        return reduce(lambda m, name: getattr(m, name, None) if m is not None else None, path.split("."), self.core(model))

    def lm_head(self, model: nn.Module) -> nn.Module | None:
        return getattr(base_model(model), "lm_head", None)

    def part_parameters(self, model: nn.Module, part: str) -> list[nn.Parameter]:
        """Parameters of one of FREEZABLE (peft-wrapped or not); the projector's are not the tower's, the head's
        are the language model's."""
        name = type(base_model(model)).__name__
        tower, projector = self.part(model, self.vision_tower), self.part(model, self.projector)
        if part == "vision_tower":
            if tower is None:
                raise ValueError(f"freeze: {name} has no vision tower ({self.name} adapter)")
            skip = {id(p) for p in projector.parameters()} if projector is not None else set()
            return [p for p in tower.parameters() if id(p) not in skip]
        if part == "projector":
            if projector is None:
                raise ValueError(f"freeze: {name} has no projector ({self.name} adapter)")
            return list(projector.parameters())
        if part == "language_model":
            lm, head = self.part(model, self.language_model), self.lm_head(model)
            if lm is None:
                raise ValueError(f"freeze: {name} has no language model ({self.name} adapter)")
            return [*lm.parameters(), *(head.parameters() if head is not None else [])]
        raise ValueError(f"freeze: unknown part {part!r}; known: {list(FREEZABLE)}")

    def vision_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The tower's and the projector's: frozen, the reference can reuse the policy's image features."""
        parts = [name for name, path in (("vision_tower", self.vision_tower), ("projector", self.projector))
                 if self.part(model, path) is not None]
        return [p for part in parts for p in self.part_parameters(model, part)]

    def unused_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """Weights the forward never uses (frozen by the builder: no optimizer state, no unused-parameter DDP)."""
        return []

    # -- the forward ----------------------------------------------------------------------------
    def scoring_support(self, model: nn.Module) -> str | None:
        """None if the policy can call the model's parts itself (image encoder, text model, LM head); else why not
        (it then uses the model's own forward)."""
        name = type(base_model(model)).__name__
        if not self.known:
            return f"no backbone adapter for model type {getattr(base_model(model).config, 'model_type', None)!r}"
        if not hasattr(self.core(model), "get_image_features"):
            return f"{name} has no `.model.get_image_features`"
        if self.lm_head(model) is None:
            return f"{name} has no `lm_head`"
        return None

    def packing_support(self, model: nn.Module, max_row: int | None = None) -> str | None:
        """None if rows with a block attention mask can go through the model; else why not."""
        config = base_model(model).config
        text = self.text_config(model)
        impl = getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", None) or "eager"
        if impl not in ("eager", "sdpa", PREFIX_ATTENTION):
            return f"attention implementation {impl!r} takes no custom block mask (eager and sdpa do)"
        window = getattr(text, "sliding_window", None) if getattr(text, "use_sliding_window", True) else None
        if window and max_row is not None and max_row > window:
            return f"a packed row ({max_row} tokens) is longer than the sliding window ({window})"
        return None

    def text_config(self, model: nn.Module):
        """The language model's config (the whole model's where it has no separate text config)."""
        config = base_model(model).config
        return getattr(config, "text_config", config)

    def image_features(self, core: nn.Module, images) -> list[Tensor]:
        """Each image's features as the language model takes them (`images`: data.batch.EncodedImages)."""
        kwargs = {k: v for k, v in images.extra.items() if k in self.image_inputs}
        return list(core.get_image_features(pixel_values=images.pixel_values, **kwargs).pooler_output)

    def positions(self, core: nn.Module, rows, row_images: Callable[[], object]) -> Tensor | None:
        """Position ids for packed rows (`rows`: data.rows.Rows) where the family numbers them its own way; None:
        the rows' own (0..n, restarted after the prompt for every response)."""
        return None

    def layer_classes(self, model: nn.Module) -> set[str]:
        """Decoder and vision encoder layer classes (transformers' `_no_split_modules`, embeddings left out):
        FSDP2's units."""
        names = set(getattr(base_model(model), "_no_split_modules", None) or ())
        return {n for n in names if not n.endswith("Embeddings")}

    @property
    def lora_exclude(self) -> str:
        """Modules LoRA leaves alone: the vision side, as LLaVA's own LoRA does (its find_all_linear_names)."""
        names = {p.split(".")[0] for p in (self.vision_tower, self.projector) if p} or {
            "vision_tower", "visual", "multi_modal_projector"}  # an unknown family: the common names
        return rf".*({'|'.join(sorted(map(re.escape, names)))}).*"

    # -- the processor ----------------------------------------------------------------------------
    def load_processor(self, path: str, trust_remote_code: bool = False):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)

    def save_processor(self, processor, out_dir) -> None:
        processor.save_pretrained(out_dir)


ADAPTERS: list[Backbone] = []


def register(adapter: Backbone) -> Backbone:
    """Make `adapter` the one for its model types (a later registration of a type wins)."""
    ADAPTERS.insert(0, adapter)
    return adapter


def _registered() -> list[Backbone]:
    import lightning_meddpo.backbones.llava  # noqa: F401  (the built-in families register themselves)
    import lightning_meddpo.backbones.qwen_vl  # noqa: F401

    return ADAPTERS


def adapter_for_type(model_type: str | None) -> Backbone:
    """The adapter serving `model_type`; an unknown type gets the defaults (`known` False: the policy then scores
    through the model's own forward)."""
    return next((a for a in _registered() if model_type in a.model_types), Backbone())


def adapter_for(model: nn.Module) -> Backbone:
    return adapter_for_type(getattr(getattr(base_model(model), "config", None), "model_type", None))


def adapter_for_processor(processor) -> Backbone:
    """The adapter whose image token the processor uses (the defaults if none claims it)."""
    token = getattr(processor, "image_token", None)
    return next((a for a in _registered() if a.image_token is not None and a.image_token == token), Backbone())


def placeholder_for(image_token: str) -> str:
    """What a prompt carries for one image, given the processor's image token (Qwen-VL: wrapped in its vision start
    and end tokens, as its chat template writes it; any other: the token itself)."""
    return next((a.image_placeholder for a in _registered() if a.image_token == image_token and a.image_placeholder),
                image_token)


def published_config(name: str):
    """A released model's configuration by name (e.g. `llava_med_7b`), from the family that publishes it."""
    for adapter in _registered():
        if name in adapter.published:
            return adapter.published[name]()
    raise ValueError(f"unknown shape {name!r}; known: {published_names()}")


def published_names() -> list[str]:
    return sorted(n for a in _registered() for n in a.published)
