"""Tokenising preference pairs with the backbone's chat template, and collating them into batches.

The prompt (chat-templated turns with the image placeholder, expanded to the image tokens by the
processor) is masked out of the labels; only response tokens are scored. An over-long pair loses
tokens from the END of its response, never image or prompt tokens; a prompt that alone does not fit
is an error naming the record.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import Tensor

from lightning_meddpo.data.batch import EncodedImages, EncodedText, PreferenceBatch, pad_stack
from lightning_meddpo.data.records import IMAGE_TOKEN, Turn

IGNORE_INDEX = -100
ROLE = {"human": "user", "gpt": "assistant"}


class PromptTooLongError(ValueError):
    """The prompt with its image tokens leaves no room for a response within max_length."""


@dataclass
class EncodedResponse:
    input_ids: Tensor  # [L]
    labels: Tensor  # [L]
    extra: dict[str, Tensor]
    truncated: bool


@dataclass
class PairEncoder:
    """Renders and tokenises (prompt, response) with the processor's chat template.

    `image_placeholder` replaces the dataset's `<image>` (e.g. Qwen2-VL's vision tokens); by default
    the processor's own image token.
    """

    processor: object
    max_length: int = 2048
    image_placeholder: str | None = None
    _placeholder: str = field(init=False)

    def __post_init__(self) -> None:
        self._placeholder = self.image_placeholder or getattr(self.processor, "image_token", IMAGE_TOKEN)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def messages(self, prompt: tuple[Turn, ...], response: str | None = None) -> list[dict[str, str]]:
        msgs = [{"role": ROLE[t.role], "content": t.text.replace(IMAGE_TOKEN, self._placeholder)} for t in prompt]
        if response is not None:
            msgs.append({"role": "assistant", "content": response})
        return msgs

    def render(self, prompt: tuple[Turn, ...], response: str) -> tuple[str, str]:
        """(prompt text with generation prompt, response text with the template's end-of-turn)."""
        apply = self.processor.apply_chat_template
        prompt_text = apply(self.messages(prompt), add_generation_prompt=True, tokenize=False)
        full_text = apply(self.messages(prompt, response), add_generation_prompt=False, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
        return prompt_text, full_text[len(prompt_text) :].rstrip("\n")

    def encode_images(self, image: Image.Image) -> EncodedImages:
        out = self.processor.image_processor(images=[image], return_tensors="pt")
        pixel_values = out.pop("pixel_values")
        return EncodedImages(pixel_values=pixel_values, extra=dict(out))

    def encode(self, prompt: tuple[Turn, ...], response: str, image: Image.Image, record_id: str) -> tuple[EncodedResponse, EncodedImages]:
        prompt_text, response_text = self.render(prompt, response)
        bos = self.tokenizer.bos_token
        # Templates that render BOS themselves (LLaVA's) must not get a second one from the tokenizer.
        add_special = not (bos and prompt_text.startswith(bos))
        enc = self.processor(text=[prompt_text], images=[image], return_tensors="pt", add_special_tokens=add_special)
        prompt_ids = enc.pop("input_ids")[0]
        enc.pop("attention_mask", None)
        pixel_values = enc.pop("pixel_values")
        mm_types = enc.pop("mm_token_type_ids", None)
        images = EncodedImages(pixel_values=pixel_values, extra=dict(enc))
        response_ids = torch.tensor(self.tokenizer(response_text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        room = self.max_length - prompt_ids.numel()
        if room < 1:
            raise PromptTooLongError(
                f"record id={record_id!r}: the prompt with its image tokens is {prompt_ids.numel()} tokens, "
                f"max_length={self.max_length} leaves no room for the response"
            )
        truncated = response_ids.numel() > room
        response_ids = response_ids[:room]
        input_ids = torch.cat([prompt_ids, response_ids])
        labels = torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), response_ids])
        extra = {}
        if mm_types is not None:
            extra["mm_token_type_ids"] = torch.cat([mm_types[0], torch.zeros_like(response_ids)])
        return EncodedResponse(input_ids, labels, extra, truncated), images


@dataclass
class EncodedPair:
    """One record, tokenised: chosen and rejected responses, image m and optional m'.
    An unpaired (KTO) record has `desirable` set and its one completion as both chosen and rejected."""

    id: str
    chosen: EncodedResponse
    rejected: EncodedResponse
    images: EncodedImages
    rejected_images: EncodedImages | None
    weight: float | None
    image_rejected: bool
    desirable: bool | None = None


def _stack_text(rows: list[EncodedResponse], pad_id: int) -> EncodedText:
    input_ids = pad_stack([r.input_ids for r in rows], pad_id)
    attention_mask = pad_stack([torch.ones_like(r.input_ids) for r in rows], 0)
    labels = pad_stack([r.labels for r in rows], IGNORE_INDEX)
    extra = {k: pad_stack([r.extra[k] for r in rows], 0) for k in rows[0].extra}
    return EncodedText(input_ids, attention_mask, labels, extra)


def _stack_images(items: list[EncodedImages]) -> EncodedImages:
    return EncodedImages(
        pixel_values=torch.cat([i.pixel_values for i in items]),
        extra={k: torch.cat([i.extra[k] for i in items]) for k in items[0].extra},
    )


@dataclass
class PreferenceCollator:
    """Pads a list of EncodedPair into a PreferenceBatch (right padding; the policy handles positions)."""

    pad_token_id: int

    def __call__(self, pairs: list[EncodedPair]) -> PreferenceBatch:
        has_mprime = [p.rejected_images is not None for p in pairs]
        if any(has_mprime) and not all(has_mprime):
            missing = [p.id for p in pairs if p.rejected_images is None]
            raise ValueError(f"records {missing} have no rejected image while others in the batch do")
        weights = [p.weight for p in pairs]
        unpaired = [p.desirable is not None for p in pairs]
        if any(unpaired) and not all(unpaired):
            raise ValueError(f"unpaired (KTO) records {[p.id for p in pairs if p.desirable is not None]} "
                             "are batched with preference pairs; use one kind per file")
        chosen = _stack_text([p.chosen for p in pairs], self.pad_token_id)
        return PreferenceBatch(
            ids=[p.id for p in pairs],
            chosen=chosen,
            rejected=chosen if all(unpaired) else _stack_text([p.rejected for p in pairs], self.pad_token_id),
            images=_stack_images([p.images for p in pairs]),
            rejected_images=_stack_images([p.rejected_images for p in pairs]) if all(has_mprime) else None,
            weights=None if any(w is None for w in weights) else torch.tensor(weights, dtype=torch.float32),
            image_rejected=torch.tensor([p.image_rejected for p in pairs]),
            desirable=torch.tensor([p.desirable for p in pairs]) if all(unpaired) else None,
        )
