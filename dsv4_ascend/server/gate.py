"""The outer ASGI middleware (`Gate`) and the state it shares with the routes and the draining server: API key on
/v1/*, 503 while draining, X-Request-Id checked and echoed, CORS for the allowed origins (Starlette's
CORSMiddleware), per-path status counters.
"""
from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse

from .body import APIError
from .metrics import Metrics
from .protocol import REQUEST_ID_HEADER, Settings, request_id
from .worker import EngineWorker

__all__ = ["AppState", "Gate", "error_response", "PATHS", "GET_HEAD"]

PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/version",
                   "/tokenize", "/detokenize", "/docs", "/openapi.json"})
GET_HEAD = ["GET", "HEAD"]  # every GET route answers HEAD too (uvicorn sends no body for HEAD)


@dataclass
class AppState:
    """What the gate, the routes and the draining server share."""

    settings: Settings
    metrics: Metrics
    worker: EngineWorker
    body_timeout: float          # seconds a request body may take to arrive
    draining: bool = False


def error_response(err: APIError) -> JSONResponse:
    # 408/413 answer before the body was read to its end: the connection cannot carry another request.
    headers = {"Connection": "close"} if err.status in (408, 413) else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _request_id(scope) -> str | None:
    """The request's X-Request-Id (None when absent); an APIError when invalid."""
    name = REQUEST_ID_HEADER.lower().encode()
    return request_id([v.decode("latin-1") for k, v in scope.get("headers") or () if k == name])


class Gate:
    """Pure ASGI middleware: API key on /v1/*, 503 while draining, X-Request-Id checked and echoed, CORS when
    origins are allowed (outside the key check, so preflights and 401s carry CORS headers), per-path status counters
    (counted when the response starts, so /metrics read after a response already counts it)."""

    def __init__(self, app, state: AppState, allowed_origins: Sequence[str] = ()) -> None:
        self.app = app
        self.state = state
        self.inner = self._guard
        if allowed_origins:
            self.inner = CORSMiddleware(self._guard, allow_origins=list(allowed_origins),
                                        allow_methods=[*GET_HEAD, "POST"], allow_headers=["*"],
                                        expose_headers=[REQUEST_ID_HEADER])

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope.get("path", "")
        known = path if path in PATHS else "other"
        counted = False
        try:
            echo = _request_id(scope)
        except APIError:
            echo = None  # refused with a 400 by _guard; an invalid value is not sent back

        async def send_counted(message) -> None:
            nonlocal counted
            if message["type"] == "http.response.start" and not counted:
                counted = True
                self.state.metrics.inc("dsv4_http_requests_total", path=known, code=str(message["status"]))
                if echo is not None:
                    message = {**message, "headers": [*(message.get("headers") or ()),
                                                      (REQUEST_ID_HEADER.lower().encode(), echo.encode())]}
            await send(message)

        try:
            await self.inner(scope, receive, send_counted)
        finally:
            if not counted:  # no response was started (the client went away, or the app failed)
                self.state.metrics.inc("dsv4_http_requests_total", path=known, code="500")

    async def _guard(self, scope, receive, send) -> None:
        path: str = scope.get("path", "")
        err = None
        key = self.state.settings.api_key
        if path.startswith("/v1/"):
            if key is not None:
                headers = dict(scope.get("headers") or [])
                auth = headers.get(b"authorization", b"").decode("latin-1")
                given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
                if not hmac.compare_digest(given.encode("utf-8", "replace"), key.encode()):
                    err = APIError("invalid or missing API key (send 'Authorization: Bearer <key>')", None, 401,
                                   code="invalid_api_key")
            if err is None and self.state.draining:
                err = APIError("the server is shutting down", None, 503, type="server_error")
        if err is None:
            try:
                _request_id(scope)
            except APIError as exc:
                err = exc
        if err is not None:
            await error_response(err)(scope, receive, send)
        else:
            await self.app(scope, receive, send)
