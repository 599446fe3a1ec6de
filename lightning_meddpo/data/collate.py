"""Tokenising preference pairs with the backbone's chat template, and collating them into batches.

Each record is encoded once, as parts (data/batch.py): the chat template renders the prompt once and
each response once; the processor expands the image placeholder and processes each image (m, and m'
as an image of its own, with the backbone's own resize/pad) exactly once. Only response tokens are
scored. An over-long pair loses tokens from the END of its responses, never image or prompt tokens;
a prompt that alone does not fit is an error naming the record.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import Tensor

from lightning_meddpo.backbones.adapter import placeholder_for
from lightning_meddpo.data.batch import (
    IGNORE_INDEX,
    EncodedImages,
    PreferenceBatch,
    TokenRows,
)
from lightning_meddpo.data.pixels import SKIPPED, PixelTable
from lightning_meddpo.data.records import IMAGE_TOKEN, Turn

ROLE = {"human": "user", "gpt": "assistant"}
TOKEN_LEVEL_EXTRAS = ("mm_token_type_ids", "token_type_ids")  # processor outputs shaped like input_ids

__all__ = ["IGNORE_INDEX", "EncodedPair", "EncodedPrompt", "PairEncoder", "PreferenceCollator", "PromptTooLongError"]


class PromptTooLongError(ValueError):
    """The prompt with its image tokens leaves no room for a response within max_length."""


@dataclass
class EncodedPrompt:
    """A prompt tokenised with its image: token row(s) and the processed image."""

    tokens: dict[str, Tensor]  # input_ids [L] and per-token extras
    image: EncodedImages

    @property
    def length(self) -> int:
        return int(self.tokens["input_ids"].numel())


@dataclass
class PairEncoder:
    """Renders and tokenises prompts and responses with the processor's chat template.

    `image_placeholder` replaces the dataset's `<image>`; by default the processor's own image token (for
    as its family's adapter writes it: backbones/adapter.py `placeholder_for`).
    `chat_template` (a Jinja template) replaces the processor's own.
    """

    processor: object
    max_length: int = 2048
    image_placeholder: str | None = None
    chat_template: str | None = None
    _placeholder: str = field(init=False)
    _pixels: PixelTable | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._placeholder = self.image_placeholder or placeholder_for(getattr(self.processor, "image_token", IMAGE_TOKEN))
        self._pixels = PixelTable.for_image_processor(getattr(self.processor, "image_processor", None))

    def _processed(self, call, **kwargs) -> dict:
        """`call(**kwargs)` (the processor or its image processor) as a dict; where the image processor's
        rescale + normalize has a PixelTable (data/pixels.py), the table does them: the same pixel values."""
        if self._pixels is not None:
            out = dict(call(**kwargs, **SKIPPED))
            if out["pixel_values"].dtype == torch.uint8:
                out["pixel_values"] = self._pixels(out["pixel_values"])
                return out
        return dict(call(**kwargs))

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def messages(self, prompt: tuple[Turn, ...], response: str | None = None) -> list[dict[str, str]]:
        msgs = [{"role": ROLE[t.role], "content": t.text.replace(IMAGE_TOKEN, self._placeholder)} for t in prompt]
        if response is not None:
            msgs.append({"role": "assistant", "content": response})
        return msgs

    def _apply(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        template = {"chat_template": self.chat_template} if self.chat_template else {}
        return self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                                  **template)

    def render_prompt(self, prompt: tuple[Turn, ...]) -> str:
        """The prompt turns with the template's generation prompt (the assistant's turn opened)."""
        return self._apply(self.messages(prompt), add_generation_prompt=True)

    def render_response(self, prompt: tuple[Turn, ...], prompt_text: str, response: str) -> str:
        """The response as the template writes it after `prompt_text`, with its end-of-turn token.

        A newline the template puts after the end-of-turn token (ChatML's `<|im_end|>\\n`) is not part
        of the response: it is never generated, so it is not scored."""
        full = self._apply(self.messages(prompt, response), add_generation_prompt=False)
        if not full.startswith(prompt_text):
            raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
        return full[len(prompt_text) :].rstrip("\n")

    def render(self, prompt: tuple[Turn, ...], response: str) -> tuple[str, str]:
        """(prompt text with generation prompt, response text with the template's end-of-turn)."""
        prompt_text = self.render_prompt(prompt)
        return prompt_text, self.render_response(prompt, prompt_text, response)

    def encode_images(self, image: Image.Image) -> EncodedImages:
        out = self._processed(self.processor.image_processor, images=[image], return_tensors="pt")
        pixel_values = out.pop("pixel_values")
        return EncodedImages(pixel_values=pixel_values, extra=dict(out))

    def encode_prompt(self, prompt_text: str, image: Image.Image) -> EncodedPrompt:
        """Tokenise the rendered prompt with one image: the processor expands the placeholder to the
        image's tokens and processes the image (once)."""
        bos = self.tokenizer.bos_token
        # Templates that render BOS themselves (LLaVA's) must not get a second one from the tokenizer.
        add_special = not (bos and prompt_text.startswith(bos))
        enc = self._processed(self.processor, text=[prompt_text], images=[image], return_tensors="pt",
                              add_special_tokens=add_special)
        tokens = {"input_ids": enc.pop("input_ids")[0]}
        enc.pop("attention_mask", None)
        for key in TOKEN_LEVEL_EXTRAS:
            if key in enc:
                tokens[key] = enc.pop(key)[0]
        pixel_values = enc.pop("pixel_values")
        return EncodedPrompt(tokens, EncodedImages(pixel_values=pixel_values, extra=enc))

    def encode_response(self, text: str) -> Tensor:
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def room(self, prompt_length: int, record_id: str) -> int:
        """Tokens left for a response after a prompt of this length; none left is an error."""
        room = self.max_length - prompt_length
        if room < 1:
            raise PromptTooLongError(
                f"record id={record_id!r}: the prompt with its image tokens is {prompt_length} tokens, "
                f"max_length={self.max_length} leaves no room for the response"
            )
        return room

    def encode(self, prompt: tuple[Turn, ...], response: str, image: Image.Image, record_id: str) -> tuple[Tensor, Tensor]:
        """One (prompt, response) sequence as a model would see it: (input_ids, labels), labels IGNORE_INDEX
        on the prompt. For inspection and tests; training encodes pairs with `encode_pair`."""
        prompt_text, response_text = self.render(prompt, response)
        encoded = self.encode_prompt(prompt_text, image)
        ids = self.encode_response(response_text)[: self.room(encoded.length, record_id)]
        prompt_ids = encoded.tokens["input_ids"]
        return torch.cat([prompt_ids, ids]), torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), ids])

    def encode_pair(self, prompt: tuple[Turn, ...], responses: list[str], image: Image.Image,
                    mprime: Image.Image | None, record_id: str) -> tuple[EncodedPrompt, EncodedPrompt | None, list[Tensor], list[bool]]:
        """(prompt on m, prompt on m' or None, response token ids, which were truncated).

        Every response is cut to fit after the longer of the two prompts, so each response is one
        token sequence whatever image it is scored on."""
        prompt_text = self.render_prompt(prompt)
        on_m = self.encode_prompt(prompt_text, image)
        on_mprime = self.encode_prompt(prompt_text, mprime) if mprime is not None else None
        room = self.room(max(on_m.length, on_mprime.length if on_mprime else 0), record_id)
        ids = [self.encode_response(self.render_response(prompt, prompt_text, r)) for r in responses]
        return on_m, on_mprime, [t[:room] for t in ids], [t.numel() > room for t in ids]


@dataclass
class EncodedPair:
    """One record, tokenised as parts. An unpaired (KTO) record has `desirable` set and `rejected` None."""

    id: str
    prompt: EncodedPrompt  # on m
    chosen: Tensor  # response token ids
    rejected: Tensor | None
    prompt_mprime: EncodedPrompt | None  # on m' (its image is m')
    weight: float | None
    image_rejected: bool
    truncated: int = 0  # responses cut at max_length
    desirable: bool | None = None
    key: str | None = None  # the record's content key (fingerprint.record_key), where the DataModule computed it


@dataclass
class PreferenceCollator:
    """Pads a list of EncodedPair into a PreferenceBatch (right padding; the policy places positions).

    In a batch where some pairs have m' and others do not (the targeted mix), the others carry m as
    their m' and are marked in `has_mprime`; a module that needs a real m' refuses them by name."""

    pad_token_id: int

    def __call__(self, pairs: list[EncodedPair]) -> PreferenceBatch:
        unpaired = [p.desirable is not None for p in pairs]
        if any(unpaired) and not all(unpaired):
            raise ValueError(f"unpaired (KTO) records {[p.id for p in pairs if p.desirable is not None]} "
                             "are batched with preference pairs; use one kind per file")
        weights = [p.weight for p in pairs]
        has_mprime = torch.tensor([p.prompt_mprime is not None for p in pairs])
        chosen = TokenRows.stack([{"input_ids": p.chosen} for p in pairs], self.pad_token_id)
        batch = PreferenceBatch(
            ids=[p.id for p in pairs],
            prompt=TokenRows.stack([p.prompt.tokens for p in pairs], self.pad_token_id),
            chosen=chosen,
            rejected=chosen if all(unpaired) else TokenRows.stack([{"input_ids": p.rejected} for p in pairs], self.pad_token_id),
            images=EncodedImages.cat([p.prompt.image for p in pairs]),
            weights=None if any(w is None for w in weights) else torch.tensor(weights, dtype=torch.float32),
            image_rejected=torch.tensor([p.image_rejected for p in pairs]),
            desirable=torch.tensor([p.desirable for p in pairs]) if all(unpaired) else None,
            keys=None if any(p.key is None for p in pairs) else [p.key for p in pairs],
        )
        if bool(has_mprime.any()):
            on_mprime = [p.prompt_mprime or p.prompt for p in pairs]
            batch.rejected_images = EncodedImages.cat([e.image for e in on_mprime])
            batch.has_mprime = has_mprime
            if any(not torch.equal(e.tokens["input_ids"], p.prompt.tokens["input_ids"]) for e, p in zip(on_mprime, pairs)):
                batch.prompt_mprime = TokenRows.stack([e.tokens for e in on_mprime], self.pad_token_id)
        return batch
