"""A real local OpenAI-compatible HTTP server for tests (http.server in a thread, ephemeral port).

`FakeLLMServer(responder)` answers POST /v1/chat/completions. `responder(body) -> reply` gets the
decoded request JSON and returns either a string (sent as the assistant content of a normal chat
completion) or a `(status, body)` tuple sent as-is (for 500s, 429s, malformed bodies). Every request
is counted and recorded, so tests can assert that a cached rerun sends nothing.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = str | tuple[int, Any]


def completion(content: str, model: str = "fake") -> dict:
    return {"id": "cmpl-test", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}]}


def last_user(body: dict) -> str:
    return [m["content"] for m in body["messages"] if m["role"] == "user"][-1]


class FakeLLMServer:
    def __init__(self, responder: Callable[[dict], Reply]):
        self.responder = responder
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, {"error": f"no route {self.path}"})
                body = json.loads(raw)
                with server._lock:
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                out = server.responder(body)
                if isinstance(out, str):
                    return self._send(200, completion(out, body.get("model", "fake")))
                status, payload = out
                self._send(status, payload)

            def _send(self, status: int, payload: Any):
                data = payload if isinstance(payload, bytes) else (
                    payload.encode() if isinstance(payload, str) else json.dumps(payload).encode())
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def __enter__(self) -> FakeLLMServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)
