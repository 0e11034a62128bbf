"""`trl-opd serve-teacher`'s HTTP side: vLLM's routes, authentication and error bodies over `teacher_engine`.

Serves any transformers causal LM with the standard library's `ThreadingHTTPServer`; `teacher_engine.TeacherEngine`
answers the requests (one at a time, under its lock) with vLLM's JSON shapes. Routes, as `vllm serve`:

- `GET /health` -> 200, empty body.
- `GET /v1/models`, `POST /v1/completions`, `POST /tokenize`, `POST /detokenize` -> `TeacherEngine`'s answers.

Errors are vLLM's `ErrorResponse` (`{"error": {"message", "type", "param", "code"}}`), unknown paths FastAPI's
`{"detail": "Not Found"}`. With an API key, paths under `/v1` need `Authorization: Bearer <key>`, else 401
`{"error": "Unauthorized"}` (vLLM's `AuthenticationMiddleware`, which also leaves `/health`, `/tokenize` and
`/detokenize` open).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .teacher_engine import RequestError, TeacherEngine

logger = logging.getLogger(__name__)

GUARDED_PREFIX = ("/v1", "/v2", "/inference", "/cohere")  # vLLM's AuthenticationMiddleware


_ROUTES = {
    ("GET", "/v1/models"): lambda engine, body: engine.model_list(),
    ("POST", "/v1/completions"): TeacherEngine.completion,
    ("POST", "/tokenize"): TeacherEngine.tokenize,
    ("POST", "/detokenize"): TeacherEngine.detokenize,
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as TRL's pooled `requests.Session` expects
    server: _TeacherHTTPServer

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def log_message(self, format: str, *args: Any) -> None:  # the request line only: headers (the key) never
        logger.info("%s - %s", self.address_string(), format % args)

    def _send(self, code: int, payload: dict | None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(code)
        if payload is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        """vLLM's `verify_token`: a `Bearer` scheme and a constant-time comparison of the hashed key."""
        scheme, _, key = (self.headers.get("Authorization") or "").partition(" ")
        digest = hashlib.sha256(key.encode()).digest()
        return scheme.lower() == "bearer" and secrets.compare_digest(digest, self.server.api_key_hash)

    def _dispatch(self, method: str) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else b""
        path = urlsplit(self.path).path
        if path == "/health":
            return self._send(200, None)
        if self.server.api_key_hash is not None and path.startswith(GUARDED_PREFIX) and not self._authorized():
            return self._send(401, {"error": "Unauthorized"})
        route = _ROUTES.get((method, path))
        if route is None:
            known = any(route_path == path for _, route_path in _ROUTES)
            return self._send(405 if known else 404, {"detail": "Method Not Allowed" if known else "Not Found"})
        try:
            body: Any = {}
            if method == "POST":
                try:
                    body = json.loads(raw)
                except ValueError as error:
                    raise RequestError(f"The request body is not valid JSON: {error}.") from error
                if not isinstance(body, dict):
                    raise RequestError(f"The request body must be a JSON object, got {type(body).__name__}.")
            self._send(200, route(self.server.engine, body))
        except RequestError as error:
            self._send(error.code, error.body())
        except Exception as error:  # noqa: BLE001 - answered as vLLM's 500, logged with its traceback
            logger.exception("teacher server: %s %s failed", method, path)
            self._send(500, RequestError(str(error), None, 500, "InternalServerError").body())


class _TeacherHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], engine: TeacherEngine, api_key: str | None):
        super().__init__(address, _Handler)
        self.engine = engine
        self.api_key_hash = None if api_key is None else hashlib.sha256(api_key.encode()).digest()


class TeacherServer:
    """A running server: `.url` to reach it, `.shutdown()` to stop it, `.wait()` to block until it stops."""

    def __init__(self, httpd: _TeacherHTTPServer):
        self.httpd = httpd
        host, port = httpd.server_address[:2]
        self.url = f"http://{host}:{port}"
        self.thread = threading.Thread(target=httpd.serve_forever, name="teacher-server", daemon=True)
        self.thread.start()

    def wait(self) -> None:
        while self.thread.is_alive():
            self.thread.join(timeout=0.5)

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def serve(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    served_model_name: str | None = None,
    api_key: str | None = None,
    model_path: str | None = None,
) -> TeacherServer:
    """Serve `model` in a background thread (port 0 picks a free port); `api_key=None` leaves the server open."""
    name = served_model_name or model_path or getattr(model, "name_or_path", None) or "teacher"
    engine = TeacherEngine(model, tokenizer, name, root=model_path or getattr(model, "name_or_path", None))
    return TeacherServer(_TeacherHTTPServer((host, port), engine, api_key))
