"""Chat templates (Jinja, in the HF `chat_template` form), selectable by name in config.

Messages are HF-style dicts {"role": "user"|"assistant"|"system", "content": str}; the image
placeholder is already in the content where the record put it.
"""

from __future__ import annotations

# A minimal template for the tiny demo backbone: USER/ASSISTANT turns, EOS after each answer.
TINY = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}USER: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}ASSISTANT: {{ m['content'] }}{{ eos_token }}\n"
    "{% else %}{{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

CHAT_TEMPLATES: dict[str, str] = {"tiny": TINY}


def get_chat_template(name: str) -> str:
    if name not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known: {sorted(CHAT_TEMPLATES)}")
    return CHAT_TEMPLATES[name]
