"""Chat templates: exact renderings through a real tokenizer's apply_chat_template, and the prefix property."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lightning_meddpo.backbones.templates import (
    CHAT_TEMPLATES,
    TEMPLATE_INFO,
    get_chat_template,
    get_template_info,
)

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<image>"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = ["USER: what is shown? ASSISTANT: a chest x-ray [INST] [/INST] system user assistant"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIALS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    path = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


def render(tokenizer, name, messages, add_generation_prompt=False):
    return tokenizer.apply_chat_template(
        messages, chat_template=get_chat_template(name), tokenize=False, add_generation_prompt=add_generation_prompt
    )


ONE = [{"role": "user", "content": "<image>\nWhat is shown?"}, {"role": "assistant", "content": "A chest X-ray."}]
TWO = ONE + [{"role": "user", "content": "Any effusion?"}, {"role": "assistant", "content": "No."}]

SYS_V1 = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
SYS_LLAVA_V1 = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

EXPECTED = {
    "v1": (
        "<s>" + SYS_V1 + " USER: <image>\nWhat is shown? ASSISTANT: A chest X-ray.</s>",
        "<s>" + SYS_V1 + " USER: <image>\nWhat is shown? ASSISTANT: A chest X-ray.</s>"
        " USER: Any effusion? ASSISTANT: No.</s>",
        "<s>" + SYS_V1 + " USER: <image>\nWhat is shown? ASSISTANT:",
    ),
    "llava_v1": (
        "<s>" + SYS_LLAVA_V1 + " USER: <image>\nWhat is shown? ASSISTANT: A chest X-ray.</s>",
        "<s>" + SYS_LLAVA_V1 + " USER: <image>\nWhat is shown? ASSISTANT: A chest X-ray.</s>"
        " USER: Any effusion? ASSISTANT: No.</s>",
        "<s>" + SYS_LLAVA_V1 + " USER: <image>\nWhat is shown? ASSISTANT:",
    ),
    "mistral_instruct": (
        "<s>[INST] <image>\nWhat is shown? [/INST] A chest X-ray. </s>",
        "<s>[INST] <image>\nWhat is shown? [/INST] A chest X-ray. </s>[INST] Any effusion? [/INST] No. </s>",
        "<s>[INST] <image>\nWhat is shown? [/INST]",
    ),
    "qwen_2": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n"
        "<|im_start|>assistant\nA chest X-ray.<|im_end|>\n",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n"
        "<|im_start|>assistant\nA chest X-ray.<|im_end|>\n"
        "<|im_start|>user\nAny effusion?<|im_end|>\n"
        "<|im_start|>assistant\nNo.<|im_end|>\n",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    "huatuo": (
        "<|user|>\n<image>\nWhat is shown?\n<|assistant|>\nA chest X-ray.</s>\n",
        "<|user|>\n<image>\nWhat is shown?\n<|assistant|>\nA chest X-ray.</s>\n"
        "<|user|>\nAny effusion?\n<|assistant|>\nNo.</s>\n",
        "<|user|>\n<image>\nWhat is shown?\n<|assistant|>\n",
    ),
    "tiny": (
        "USER: <image>\nWhat is shown?\nASSISTANT: A chest X-ray.</s>\n",
        "USER: <image>\nWhat is shown?\nASSISTANT: A chest X-ray.</s>\nUSER: Any effusion?\nASSISTANT: No.</s>\n",
        "USER: <image>\nWhat is shown?\nASSISTANT:",
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_exact_renderings(tokenizer, name):
    one, two, prompt = EXPECTED[name]
    assert render(tokenizer, name, ONE) == one
    assert render(tokenizer, name, TWO) == two
    assert render(tokenizer, name, ONE[:1], add_generation_prompt=True) == prompt


def test_vicuna_v1_alias_and_qwen2_vl_share_formats(tokenizer):
    assert render(tokenizer, "vicuna_v1", TWO) == render(tokenizer, "v1", TWO)
    vl = [{"role": "user", "content": "<|vision_start|><|image_pad|><|vision_end|>\nWhat is shown?"}]
    assert render(tokenizer, "qwen2_vl", vl, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>\nWhat is shown?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_system_message_overrides_default(tokenizer):
    sys = [{"role": "system", "content": "You are a radiologist."}]
    assert render(tokenizer, "v1", sys + ONE[:1], add_generation_prompt=True) == (
        "<s>You are a radiologist. USER: <image>\nWhat is shown? ASSISTANT:"
    )
    assert render(tokenizer, "mistral_instruct", sys + ONE) == (
        "<s>[INST] <<SYS>>\nYou are a radiologist.\n<</SYS>>\n\n<image>\nWhat is shown? [/INST] A chest X-ray. </s>"
    )
    assert render(tokenizer, "qwen_2", sys + ONE[:1], add_generation_prompt=True).startswith(
        "<|im_start|>system\nYou are a radiologist.<|im_end|>\n<|im_start|>user\n"
    )


@pytest.mark.parametrize("name", sorted(TEMPLATE_INFO))
@pytest.mark.parametrize("conversation", [ONE, TWO, [{"role": "system", "content": "Be brief."}] + TWO])
def test_prefix_property(tokenizer, name, conversation):
    """full render == prompt render (add_generation_prompt) + assistant prefix + response + end marker."""
    info = get_template_info(name)
    full = render(tokenizer, name, conversation)
    prompt = render(tokenizer, name, conversation[:-1], add_generation_prompt=True)
    assert full == prompt + info.assistant_suffix(conversation[-1]["content"], tokenizer.eos_token)
    assert full.startswith(prompt)


def test_registry_api():
    assert set(CHAT_TEMPLATES) == set(TEMPLATE_INFO)
    assert get_chat_template("tiny") == TEMPLATE_INFO["tiny"].template
    assert TEMPLATE_INFO["huatuo"].stops("<|endoftext|>") == ["<|endoftext|>"]
    assert TEMPLATE_INFO["mistral_instruct"].stops("</s>") == ["</s>"]
    with pytest.raises(ValueError, match="unknown chat template"):
        get_chat_template("nope")
    with pytest.raises(ValueError, match="unknown chat template"):
        get_template_info("nope")
