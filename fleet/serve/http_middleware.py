"""The ASGI middleware of ``fleet serve`` (:mod:`fleet.serve.http`), pure ASGI classes (not BaseHTTPMiddleware).

:class:`RequestMetrics` times and counts every request (:class:`~fleet.serve.http_metrics.HttpMetrics`);
:class:`BodyLimit` bounds request bodies (``Content-Length`` and streamed bytes: 413 beyond the limit), reads the
body once and hands it to the endpoint through the scope (:func:`_body`).
"""

from __future__ import annotations

import time

from starlette.requests import Request

from fleet.serve.http_metrics import HttpMetrics
from fleet.serve.http_schemas import _dumps

#: After refusing an oversized body we still read (and drop) up to this many bytes, so the client
#: gets to read the 413 instead of a connection reset.
DRAIN_LIMIT_BYTES = 16 * 2**20
_BODY_KEY = "fleet.body"


class RequestMetrics:
    """Pure ASGI middleware: records each HTTP request's endpoint, status and time from its start to the end of
    its response in ``metrics`` (status 500 when the app raised before answering)."""

    def __init__(self, app, metrics: HttpMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe(scope.get("path", ""), status[0], time.perf_counter() - started)


class BodyLimit:
    """Pure ASGI middleware: bounds request bodies to ``max_body_bytes`` (``Content-Length`` and streamed bytes;
    413 ``payload_too_large`` beyond, 400 for a bad ``Content-Length`` or a client gone). The body of a POST, PUT
    or PATCH is read here once and handed to the endpoint through the scope (:func:`_body`)."""

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            body, problem = await self._read_body(scope, receive)
            if problem is not None:
                await _send_error(send, *problem)
                return
            scope[_BODY_KEY] = body
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _read_body(self, scope, receive) -> tuple[bytes, tuple | None]:
        limit = self.max_body_bytes
        declared = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return b"", (400, "bad_request", "Content-Length is not an integer")
        too_large = (413, "payload_too_large", f"request body exceeds {limit} bytes")
        if declared is not None and declared > limit:
            await _drain(receive)
            return b"", too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", (400, "bad_request", "client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                if message.get("more_body", False):
                    await _drain(receive)
                return b"", too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


async def _drain(receive) -> None:
    drained = 0
    while drained <= DRAIN_LIMIT_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _replay(body: bytes, receive):
    done = False

    async def replay():
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls wait for the disconnect

    return replay


async def _send_error(send, status: int, code: str, detail: str) -> None:
    payload = _dumps({"code": code, "detail": detail})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def _body(request: Request) -> bytes:
    """The body :class:`BodyLimit` read for ``request`` (empty when it read none)."""
    return request.scope.get(_BODY_KEY, b"")


__all__ = ["DRAIN_LIMIT_BYTES", "BodyLimit", "RequestMetrics"]
