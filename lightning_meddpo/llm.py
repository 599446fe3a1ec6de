"""A small OpenAI-compatible chat-completions client with retries and an on-disk cache.

Used by the NLI judge (`eval/judge.py`) and the hallucination rewriter (`commands/rewriter.py`). Standard
library only (urllib, json, hashlib, threading): no SDK dependency.

- POST ``{url}/chat/completions`` with ``model``, ``messages`` and ``temperature`` (0 by default).
- The API key is read from the environment variable whose *name* is ``api_key_env`` (default
  ``OPENAI_API_KEY``). A missing key is allowed (local servers such as vLLM or llama.cpp); the
  ``Authorization`` header is then simply not sent.
- Network errors, timeouts, HTTP 429 and HTTP 5xx, and an HTTP 200 whose body is not a chat completion
  (a proxy's error page, a truncated reply) are retried with exponential backoff (``backoff_base *
  2**attempt``, capped at ``backoff_max``; a ``Retry-After`` header is honoured up to the cap). Other HTTP
  errors fail at once. Every error (`LLMError`, with ``.url``, ``.status``, ``.attempts``) names the URL
  and the status, and never the API key: its value is masked wherever a server echoes it.
- With ``cache_dir`` set, each reply is stored as one JSON file named by the sha256 of
  (url, model, messages, temperature). Files are written to a temporary name and moved into place with
  ``os.replace`` (atomic on POSIX) after an fsync, so concurrent writers — threads or processes, e.g.
  several ranks — never leave a torn entry, and a killed job keeps every reply it finished: a rerun reads
  them and sends no request for them. Entries hold the request and the reply, never the key.
- ``complete_many`` runs many conversations through a thread pool and returns replies in input order.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

Message = dict[str, str]
Messages = Sequence[Message]

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504}) | frozenset(range(520, 530))


class LLMError(RuntimeError):
    """A chat-completions request that failed for good. `status` is the HTTP status (None: no reply)."""

    def __init__(self, message: str, *, url: str, status: int | None = None, attempts: int = 1, secret: str | None = None):
        self.url, self.status, self.attempts = url, status, attempts
        super().__init__(mask(message, secret))


def mask(text: str, secret: str | None) -> str:
    """`text` with every occurrence of `secret` (an API key) replaced by "***"."""
    return text.replace(secret, "***") if secret else text


def _check_messages(messages: Messages) -> list[Message]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise TypeError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.200}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TypeError(f"messages[{i}] must be a dict with string 'role' and 'content', got {m!r:.200}")
        out.append(dict(m))
    return out


class LLMClient:
    """OpenAI-compatible chat client. Thread-safe; one instance can serve a whole evaluation.

    Args:
        url: API base, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
        model: model name sent in every request.
        api_key_env: NAME of the environment variable holding the key (read at each request).
        temperature: sampling temperature (0: as deterministic as the server allows).
        timeout: seconds per HTTP request.
        max_attempts: total tries per request (1 = no retry).
        backoff_base, backoff_max: sleep ``min(backoff_max, backoff_base * 2**k)`` after failed try k.
        cache_dir: directory for the reply cache; None disables caching.
        max_tokens: optional ``max_tokens`` sent with the request (part of the cache key when set).
        extra_body: further request fields (e.g. ``{"seed": 0}``); part of the cache key when set.
        sleep: the sleep function (tests pass a no-op or a recorder).
    """

    def __init__(
        self,
        url: str = "https://api.openai.com/v1",
        model: str = "gpt-4o",
        *,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 0.0,
        timeout: float = 60.0,
        max_attempts: int = 5,
        backoff_base: float = 1.0,
        backoff_max: float = 30.0,
        cache_dir: str | os.PathLike | None = None,
        max_tokens: int | None = None,
        extra_body: dict[str, Any] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.url = url.rstrip("/")
        self.endpoint = self.url + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.temperature = float(temperature)
        self.timeout = float(timeout)
        self.max_attempts = int(max_attempts)
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_tokens = max_tokens
        self.extra_body = dict(extra_body or {})
        self._sleep = sleep
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "retries": 0, "cache_hits": 0, "cache_misses": 0}

    def __repr__(self) -> str:
        return f"LLMClient(url={self.url!r}, model={self.model!r}, cache_dir={self.cache_dir})"

    # ----------------------------------------------------------------- cache
    def cache_key(self, messages: Messages) -> str:
        """sha256 over (url, model, messages, temperature [, max_tokens, extra_body])."""
        payload: dict[str, Any] = {
            "url": self.url,
            "model": self.model,
            "messages": _check_messages(messages),
            "temperature": self.temperature,
        }
        if self.max_tokens is not None:
            payload["max_tokens"] = self.max_tokens
        if self.extra_body:
            payload["extra_body"] = self.extra_body
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _cache_path(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / key[:2] / f"{key}.json"

    def _cache_get(self, key: str) -> str | None:
        if self.cache_dir is None:
            return None
        path = self._cache_path(key)
        try:
            with open(path, encoding="utf-8") as f:
                entry = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return None  # unreadable entry (should not happen with atomic writes): refetch and overwrite
        reply = entry.get("reply") if isinstance(entry, dict) else None
        return reply if isinstance(reply, str) else None

    def _cache_put(self, key: str, messages: list[Message], reply: str) -> None:
        if self.cache_dir is None:
            return
        path = self._cache_path(key)
        entry = {"key": key, "url": self.url, "model": self.model, "temperature": self.temperature,
                 "messages": messages, "reply": reply, "created": time.time()}
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entry, f, ensure_ascii=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            if isinstance(e, OSError):  # a full disk: one line naming the cache file (finished replies stay)
                raise OSError(e.errno, f"cannot write the reply cache {path}: {e.strerror or e}") from e
            raise

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    # --------------------------------------------------------------- request
    def _key(self) -> str | None:
        return os.environ.get(self.api_key_env) or None

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = self._key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _body(self, messages: list[Message]) -> bytes:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        body.update(self.extra_body)
        return json.dumps(body, ensure_ascii=False).encode("utf-8")

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        delay = self.backoff_base * (2**attempt)
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        return min(delay, self.backoff_max)

    def _parse_reply(self, raw: bytes) -> str:
        try:
            data = json.loads(raw.decode("utf-8"))
            content = data["choices"][0]["message"]["content"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
            raise LLMError(
                f"POST {self.endpoint}: HTTP 200 but the body is not a chat completion "
                f"({type(e).__name__}: {e}); body starts {raw[:300]!r}",
                url=self.endpoint, status=200,
            ) from e
        if content is None:
            content = ""  # e.g. a refusal or tool call: an empty reply, which callers reject themselves
        if not isinstance(content, str):
            raise LLMError(f"POST {self.endpoint}: 'content' is {type(content).__name__}, expected a string",
                           url=self.endpoint, status=200)
        return content

    def _request(self, messages: list[Message]) -> str:
        body = self._body(messages)
        last: str = ""
        last_status: int | None = None
        for attempt in range(self.max_attempts):
            if attempt:
                self._count("retries")
            self._count("requests")
            req = urllib.request.Request(self.endpoint, data=body, headers=self._headers(), method="POST")
            retry_after = None
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                try:
                    return self._parse_reply(raw)
                except LLMError as e:  # HTTP 200 but no chat completion: retried like a server error
                    last_status, last = 200, str(e)
            except urllib.error.HTTPError as e:
                try:
                    detail = e.read()[:500].decode("utf-8", "replace")
                except Exception:  # noqa: BLE001 - the body is only for the message
                    detail = ""
                last_status = e.code
                last = f"HTTP {e.code} {e.reason}: {detail}".strip()
                if e.code not in RETRY_STATUS:
                    raise LLMError(f"POST {self.endpoint} failed: {last}", url=self.endpoint,
                                   status=e.code, attempts=attempt + 1, secret=self._key()) from None
                retry_after = e.headers.get("Retry-After") if e.headers else None
            except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout, OSError) as e:
                reason = getattr(e, "reason", e)
                last_status = None
                last = f"network error: {type(reason).__name__}: {reason}"
            if attempt + 1 < self.max_attempts:
                self._sleep(self._backoff(attempt, retry_after))
        status = f"HTTP {last_status}" if last_status is not None else "no HTTP reply"
        raise LLMError(f"POST {self.endpoint} failed after {self.max_attempts} attempt(s) ({status}); last: {last}",
                       url=self.endpoint, status=last_status, attempts=self.max_attempts, secret=self._key())

    # ------------------------------------------------------------------- API
    def complete(self, messages: Messages, *, use_cache: bool = True) -> str:
        """The assistant reply to one conversation. Cached by `cache_key` unless `use_cache=False`
        (then the cache is neither read nor written)."""
        msgs = _check_messages(messages)
        key = self.cache_key(msgs) if (use_cache and self.cache_dir is not None) else None
        if key is not None:
            hit = self._cache_get(key)
            if hit is not None:
                self._count("cache_hits")
                return hit
            self._count("cache_misses")
        reply = self._request(msgs)
        if key is not None:
            self._cache_put(key, msgs, reply)
        return reply

    def complete_many(self, conversations: Sequence[Messages], max_workers: int = 8,
                      *, use_cache: bool = True) -> list[str]:
        """Replies to many conversations, in input order, using up to `max_workers` threads.
        The first failure is raised (after the other in-flight requests finish)."""
        conversations = list(conversations)
        if not conversations:
            return []
        if max_workers <= 1 or len(conversations) == 1:
            return [self.complete(m, use_cache=use_cache) for m in conversations]
        with ThreadPoolExecutor(max_workers=min(max_workers, len(conversations)),
                                thread_name_prefix="llm") as pool:
            return list(pool.map(lambda m: self.complete(m, use_cache=use_cache), conversations))


def chat(system: str | None, user: str) -> list[Message]:
    """A one-turn conversation: optional system message + user message."""
    msgs: list[Message] = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": user})
    return msgs
