"""LLM rewriter: turns a correct answer into a plausible visual-misinterpretation hallucination.

`LLMRewriter(client)` is a callable ``(question, answer) -> rejected answer`` for preference-pair
construction (``build_pairs(..., rewriter=LLMRewriter(client))``), in the spirit of the paper's GPT-4o
rewrites: the LLM changes exactly one visually grounded attribute — laterality, location, modality,
presence or size — keeps everything else (wording, length, style), and replies with the rewritten
answer only.

Replies are cleaned of surrounding quotes, code fences and a leading "Rewritten answer:" label. A reply
that is empty or equal to the original answer after normalisation (`normalize_answer`: case,
punctuation, articles) is rejected and the request is retried in the same conversation with a
corrective turn (deterministic, so also cached); after `max_attempts` a `RewriteError` names the
question, the answer and the last reply. With the client's cache, rebuilding the pairs costs nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from lightning_meddpo.llm import LLMClient, Message
from lightning_meddpo.text import normalize_answer

__all__ = ["LLMRewriter", "RewriteError", "DEFAULT_ATTRIBUTES"]

DEFAULT_ATTRIBUTES = ("laterality", "location", "modality", "presence", "size")

SYSTEM_PROMPT = (
    "You create realistic errors for training medical vision-language models. Given a question about "
    "a medical image and its correct answer, you rewrite the answer so that it reflects a plausible "
    "misreading of the image."
)
USER_TEMPLATE = (
    "Question: {question}\n"
    "Correct answer: {answer}\n\n"
    "Rewrite the correct answer as a visual misinterpretation: change exactly one visually grounded "
    "attribute ({attributes}) — for example left instead of right, another anatomical location, "
    "another imaging modality, present instead of absent (or the reverse), larger instead of smaller — "
    "and keep everything else (wording, length, style) unchanged. The result must be clinically "
    "plausible and must differ in meaning from the correct answer.\n"
    "Reply with the rewritten answer only."
)
RETRY_PROMPT = (
    "That is not a valid rewrite: it is empty or says the same as the correct answer. Change exactly "
    "one visually grounded attribute so that the meaning differs, and reply with the rewritten answer only."
)

_FENCE = re.compile(r"^```[a-z]*\s*|\s*```$", re.IGNORECASE)
_LABEL = re.compile(r"^\s*(?:\*\*)?(?:rewritten|hallucinated|modified|new|incorrect)?\s*answer\s*(?:\*\*)?\s*:\s*(?:\*\*)?",
                    re.IGNORECASE)
_QUOTES = "\"'\u201c\u201d\u2018\u2019`"


class RewriteError(RuntimeError):
    """The LLM gave no usable rewrite after all attempts."""


def clean_reply(reply: str) -> str:
    """Strip code fences, a leading "Rewritten answer:" label and surrounding quotes."""
    text = _FENCE.sub("", reply.strip()).strip()
    text = _unquote(text)
    text = _LABEL.sub("", text, count=1).strip()
    return _unquote(text)


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return text


class LLMRewriter:
    """Callable ``(question, answer) -> hallucinated answer``.

    Args:
        client: the `LLMClient` of the rewriting model (temperature 0 and a cache_dir recommended).
        attributes: the visually grounded attributes the prompt offers for the change.
        max_attempts: total requests per answer before `RewriteError` (>= 1).
        system_prompt: override of the system message (None: no system message).
    """

    def __init__(self, client: LLMClient, *, attributes: Sequence[str] = DEFAULT_ATTRIBUTES,
                 max_attempts: int = 3, system_prompt: str | None = SYSTEM_PROMPT):
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if not attributes:
            raise ValueError("attributes must name at least one visually grounded attribute")
        self.client, self.attributes = client, tuple(attributes)
        self.max_attempts, self.system_prompt = max_attempts, system_prompt

    def messages(self, question: str, answer: str) -> list[Message]:
        msgs: list[Message] = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        msgs.append({"role": "user", "content": USER_TEMPLATE.format(
            question=question.strip(), answer=answer.strip(), attributes=", ".join(self.attributes))})
        return msgs

    def is_valid(self, answer: str, rewrite: str) -> bool:
        norm = normalize_answer(rewrite)
        return bool(norm) and norm != normalize_answer(answer)

    def __call__(self, question: str, answer: str) -> str:
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"cannot rewrite an empty answer (question {question!r:.200})")
        convo = self.messages(question, answer)
        replies: list[str] = []
        for attempt in range(self.max_attempts):
            if attempt:
                convo = convo + [{"role": "assistant", "content": replies[-1]},
                                 {"role": "user", "content": RETRY_PROMPT}]
            raw = self.client.complete(convo)
            replies.append(raw)
            rewrite = clean_reply(raw)
            if self.is_valid(answer, rewrite):
                return rewrite
        raise RewriteError(
            f"LLM at {getattr(self.client, 'endpoint', self.client)} (model {getattr(self.client, 'model', '?')!r}) gave no rewrite that differs from "
            f"the answer after {self.max_attempts} attempt(s): question {question!r:.200}, "
            f"answer {answer!r:.200}, last reply {replies[-1]!r:.200}"
        )
