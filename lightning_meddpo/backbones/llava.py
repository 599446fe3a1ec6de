"""LLaVA (`LlavaForConditionalGeneration`): a CLIP tower, a projector, a Llama / Mistral / Qwen2 language model.

LLaVA-Med v1.5 and HuatuoGPT-Vision v1 are LLaVA models once converted (llava_convert.py, the `convert` program). The prompt carries
the processor's `<image>` token, which the processor expands to the image's tokens.
"""

from __future__ import annotations

from torch import nn

from lightning_meddpo.backbones.adapter import Backbone, base_model, register


def _clip_l336():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, projection_dim=768)


def _llava(text):
    from transformers import LlavaConfig

    return LlavaConfig(vision_config=_clip_l336(), text_config=text, vision_feature_layer=-2, image_seq_length=576,
                       vision_feature_select_strategy="default", image_token_index=text.vocab_size - 1)


def llava_med_7b():
    """LLaVA-Med v1.5's released dimensions: Mistral-7B + CLIP ViT-L/14 at 336 px, layer -2, 576 image tokens,
    LLaVA's two-layer GELU projector."""
    from transformers import MistralConfig

    return _llava(MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                num_key_value_heads=8, vocab_size=32064, max_position_embeddings=32768,
                                sliding_window=None, tie_word_embeddings=False))


def huatuo_7b():
    """HuatuoGPT-Vision-7B's released dimensions: Qwen2-7B + the same CLIP and projector."""
    from transformers import Qwen2Config

    return _llava(Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                              num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                              tie_word_embeddings=False))


class LlavaBackbone(Backbone):
    name = "llava"
    model_types = ("llava",)
    vision_tower = "vision_tower"
    projector = "multi_modal_projector"
    image_token = "<image>"
    published = {"llava_med_7b": llava_med_7b, "huatuo_7b": huatuo_7b}

    def unused_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """LLaVA takes features from `vision_feature_layer` (-2 for LLaVA-1.5 / LLaVA-Med): the encoder layers after
        it and CLIP's post_layernorm never get a gradient."""
        tower = self.part(model, self.vision_tower)
        layer = getattr(base_model(model).config, "vision_feature_layer", None)
        vision = getattr(tower, "vision_model", tower)
        encoder = getattr(vision, "encoder", None)
        if tower is None or layer is None or encoder is None or not hasattr(encoder, "layers"):
            return []
        n = len(encoder.layers)
        used = max((k if k >= 0 else n + 1 + k) for k in (layer if isinstance(layer, (list, tuple)) else [layer]))
        unused = [(f"encoder.layers.{i}.{name}", p) for i in range(used, n) for name, p in encoder.layers[i].named_parameters()]
        post = getattr(vision, "post_layernorm", None)
        return unused + [(f"post_layernorm.{name}", p) for name, p in (post.named_parameters() if post is not None else [])]


register(LlavaBackbone())
