"""Chat templates (Jinja, in the HF `chat_template` form), selectable by name in config.

Messages are HF-style dicts {"role": "user"|"assistant"|"system", "content": str}; the image
placeholder is already in the content where the record put it (the collator writes the processor's image
token there, data/collate.py).

Prefix property (the collator relies on it): for a conversation ending in an assistant turn with content
`response`,

    render(messages) == render(messages[:-1], add_generation_prompt=True) + assistant_suffix(name, response)

where `assistant_suffix` = `info.assistant_prefix + response + info.end_of_turn`. `assistant_prefix` is ""
for ChatML; for the LLaVA formats it is the single space that the originals put between "ASSISTANT:" /
"[/INST]" and the answer. The generation prompt deliberately ends *without* that space, as in the original
inference code: SentencePiece tokenizers merge it into the first answer token ("▁The"), so the space belongs
to the response tokens.

Templates that start with `{{ bos_token }}` (info.adds_bos) expect the rendered text to be tokenized with
add_special_tokens=False, which is what `apply_chat_template(tokenize=True)` does; LLaVA's own
`tokenizer_image_token` also put exactly one BOS in front of the prompt.

Sources of the formats (checked against the original code; strings reproduced, code not copied):
- "v1": microsoft/LLaVA-Med llava/conversation.py `conv_vicuna_v1` (conv_templates["v1"] and
  ["vicuna_v1"], the default `--conv-mode vicuna_v1` of llava/eval/model_vqa.py); SeparatorStyle.TWO with
  sep=" ", sep2="</s>": "SYSTEM USER: q ASSISTANT: a</s> USER: q2 ASSISTANT: a2</s>". Its system prompt
  says "curious user ... the user's questions" (as in haotian-liu/LLaVA's conv_vicuna_v1).
- "llava_v1": the same format with `conv_llava_v1`'s system prompt ("curious human ... the human's
  questions"), registered as conv_templates["llava_v1"] in both repositories.
- "mistral_instruct": microsoft/LLaVA-Med `conv_mistral_instruct` (SeparatorStyle.LLAMA_2, system "",
  sep "", sep2 "</s>"), used with `--conv-mode mistral_instruct` for llava-med-v1.5-mistral-7b:
  "[INST] q [/INST] a </s>[INST] q2 [/INST] a2 </s>"; a system message is wrapped as
  "<<SYS>>\\n...\\n<</SYS>>\\n\\n" in front of the first user message (LLAMA_2's wrap_sys).
- "qwen_2": ChatML as in Qwen2's own chat template, default system "You are a helpful assistant.":
  "<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\nq<|im_end|>\\n<|im_start|>assistant\\na<|im_end|>\\n".
  NOTE: FreedomIntelligence/HuatuoGPT-Vision's released cli.py (HuatuoChatbot.preprocess_huatuo) feeds the
  LLaVA-Qwen2 7B model "<|user|>\\n{q}\\n<|assistant|>\\n" instead (history turns "<|assistant|>\\n{a} \\n");
  that format is registered as "huatuo" (below); "qwen_2" stays the ChatML variant.
- "huatuo": HuatuoGPT-Vision cli.py's prompt format exactly: "<|user|>\n{q.strip()}\n" per user turn,
  "<|assistant|>\n" as the generation prompt, no system prompt. Its assistant turns are rendered here as
  "<|assistant|>\n{a}" + eos_token + "\n": cli.py stops generation at eos_token_id (so answers ended with
  EOS in training) while its chat *history* writes "{a} \n" without EOS; the training format itself is not
  released, so this end marker is our inference from the stopping rule. A system message, if given, is
  written as "{system}\n" first (cli.py has none).
- "qwen2_vl": the same ChatML with the Qwen2-VL image placeholder
  "<|vision_start|><|image_pad|><|vision_end|>" (the Qwen2/2.5-VL processors' template, as used by the
  Qwen2.5-VL HuatuoGPT-Vision training script).
"""

from __future__ import annotations

from dataclasses import dataclass

# A minimal template for the tiny demo backbone: USER/ASSISTANT turns, EOS after each answer.
TINY = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}USER: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}ASSISTANT: {{ m['content'] }}{{ eos_token }}\n"
    "{% else %}{{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
QWEN_SYSTEM = "You are a helpful assistant."

_BOS = "{% if bos_token %}{{ bos_token }}{% endif %}"
_BAD_ROLE = "{{ raise_exception('unknown role ' + m['role'] + ' (expected user, assistant or system)') }}"


def _jinja_str(s: str) -> str:
    """A Python string as a Jinja string literal."""
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _split_system(default: str) -> str:
    """Jinja prelude: `system` = a leading system message's content (else `default`); `turns` = the rest."""
    return (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
        "{% else %}"
        "{% set system = " + _jinja_str(default) + " %}{% set turns = messages %}"
        "{% endif %}"
    )


def _vicuna_v1(default_system: str) -> str:
    # SeparatorStyle.TWO: system + " " + "USER: q" + " " + "ASSISTANT: a" + "</s> " ..., stripped at the end;
    # written here as " USER: q", " ASSISTANT: a</s>" so that no trailing separator is left to strip.
    return (
        _BOS
        + _split_system(default_system)
        + "{{ system }}"
        "{% for m in turns %}"
        "{% if m['role'] == 'user' %}{{ ' USER: ' + m['content'] }}"
        "{% elif m['role'] == 'assistant' %}{{ ' ASSISTANT: ' + m['content'] + '</s>' }}"
        "{% else %}" + _BAD_ROLE + "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
    )


V1 = _vicuna_v1(VICUNA_V1_SYSTEM)
LLAVA_V1 = _vicuna_v1(LLAVA_V1_SYSTEM)

# SeparatorStyle.LLAMA_2 with sep="" and sep2="</s>": "[INST] q [/INST]" + " a </s>" per turn.
MISTRAL_INSTRUCT = (
    _BOS
    + _split_system("")
    + "{% for m in turns %}"
    "{% if m['role'] == 'user' %}"
    "{% if loop.first and system %}{{ '[INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endif %}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + ' </s>' }}"
    "{% else %}" + _BAD_ROLE + "{% endif %}"
    "{% endfor %}"
)

CHATML = (
    _split_system(QWEN_SYSTEM)
    + "{{ '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}"
    "{% for m in turns %}"
    "{% if m['role'] in ['user', 'assistant'] %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% else %}" + _BAD_ROLE + "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# HuatuoGPT-Vision cli.py (HuatuoChatbot.preprocess_huatuo): "<|user|>\n{q}\n<|assistant|>\n".
HUATUO = (
    _split_system("")
    + "{% if system %}{{ system + '\n' }}{% endif %}"
    "{% for m in turns %}"
    "{% if m['role'] == 'user' %}{{ '<|user|>\n' + (m['content'] | trim) + '\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ '<|assistant|>\n' + m['content'] + eos_token + '\n' }}"
    "{% else %}" + _BAD_ROLE + "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TemplateInfo:
    """A chat template and what a collator / generator needs to know about it.

    assistant_prefix, end_of_turn: full render == prompt render (add_generation_prompt=True)
        + assistant_prefix + response + end_of_turn. `end_of_turn` may contain "{eos_token}".
    adds_bos: the template writes the BOS token itself (tokenize with add_special_tokens=False).
    stop_strings: where generation should stop.
    """

    name: str
    template: str
    assistant_prefix: str = ""
    end_of_turn: str = ""
    adds_bos: bool = False
    stop_strings: tuple[str, ...] = ()

    def end_marker(self, eos_token: str | None = None) -> str:
        return self.end_of_turn.replace("{eos_token}", eos_token or "")

    def stops(self, eos_token: str | None = None) -> list[str]:
        """`stop_strings` with "{eos_token}" filled in."""
        return [x.replace("{eos_token}", eos_token or "") for x in self.stop_strings if x.replace("{eos_token}", eos_token or "")]

    def assistant_suffix(self, response: str, eos_token: str | None = None) -> str:
        """What follows the generation prompt when the assistant answers `response` (with its end marker)."""
        return self.assistant_prefix + response + self.end_marker(eos_token)


TEMPLATE_INFO: dict[str, TemplateInfo] = {
    "tiny": TemplateInfo("tiny", TINY, " ", "{eos_token}\n", False, ("{eos_token}",)),
    "v1": TemplateInfo("v1", V1, " ", "</s>", True, ("</s>",)),
    "llava_v1": TemplateInfo("llava_v1", LLAVA_V1, " ", "</s>", True, ("</s>",)),
    "mistral_instruct": TemplateInfo("mistral_instruct", MISTRAL_INSTRUCT, " ", " </s>", True, ("</s>",)),
    "qwen_2": TemplateInfo("qwen_2", CHATML, "", "<|im_end|>\n", False, ("<|im_end|>",)),
    "qwen2_vl": TemplateInfo("qwen2_vl", CHATML, "", "<|im_end|>\n", False, ("<|im_end|>",)),  # its image: collate.py
    "huatuo": TemplateInfo("huatuo", HUATUO, "", "{eos_token}\n", False, ("{eos_token}",)),
}
TEMPLATE_INFO["vicuna_v1"] = TemplateInfo(**{**TEMPLATE_INFO["v1"].__dict__, "name": "vicuna_v1"})

CHAT_TEMPLATES: dict[str, str] = {name: info.template for name, info in TEMPLATE_INFO.items()}

def get_template_info(name: str) -> TemplateInfo:
    if name not in TEMPLATE_INFO:
        raise ValueError(f"unknown chat template {name!r}; known: {sorted(TEMPLATE_INFO)}")
    return TEMPLATE_INFO[name]


def get_chat_template(name: str) -> str:
    if name not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known: {sorted(CHAT_TEMPLATES)}")
    return CHAT_TEMPLATES[name]
