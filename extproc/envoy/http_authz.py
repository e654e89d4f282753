"""ext_authz over HTTP/1.1: the same admission as the gRPC Check, for about a tenth of its CPU.

Envoy's ext_authz filter can ask an HTTP service instead of a gRPC one (``http_service``,
envoyproxy/envoy api/envoy/extensions/filters/http/ext_authz/v3/ext_authz.proto): it sends the
client's method, path (behind ``path_prefix``), headers and buffered body, and reads the answer
from the reply's status (200 admits), headers and body. A do-nothing grpc.aio Check costs about
as much CPU as Envoy spends on the whole request; this server, one asyncio protocol per
connection parsed by httptools, costs about 20 µs (docs/benchmarks.md), which is what lets the
sidecar's CPU per request fall below Envoy's.

Envoy's HTTP client sends one request at a time on a connection; requests that arrive pipelined
are still answered in order. The path ``/health`` (outside ``CHECK_PREFIX``) answers 200 while
serving and 503 while draining, for Envoy's health check; ``POST /settle`` is the Lua settle
filter's (extproc/envoy/http_settle.py). With ``server.tls`` set, the port speaks TLS with the
gRPC port's certificate, client CA and client names (``extproc.tls.HttpTls``). Input that is
not HTTP gets a 400 and the connection is closed; nothing a client sends can raise out of here.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import httptools

from extproc.admission import AdmissionRequest
from extproc.envoy import replies
from extproc.envoy.authz_service import AuthorizationService
from extproc.envoy.http_settle import (
    BODY_ENCODING_HEADER,
    BODY_TYPE_HEADER,
    BYTES_HEADER,
    SETTLE_PATH,
    STATUS_HEADER,
    HttpSettle,
)
from extproc.tls import HttpTls

log = logging.getLogger("extproc.authz.http")

CHECK_PREFIX = "/check"  # ext_authz's path_prefix: everything under it is a check
HEALTH_PATH = "/health"
MAX_BODY_BYTES = 1 << 20  # ext_authz buffers 64 KiB of the client's body; a little slack
_BAD_REQUEST = replies.http_response(400, [("connection", "close")], b"bad request")
_SERVING = replies.http_response(200, [])
_DRAINING = replies.http_response(503, [])
# A bug of ours while answering: Envoy's ext_authz reads a 5xx as an error (its status_on_error,
# 503: fail closed), the settle filter leaves the response to the access log. The connection
# goes on with the next request instead of waiting forever for this answer.
_INTERNAL_ERROR = replies.http_response(500, [])


class _Request:
    __slots__ = ("body", "headers", "method", "url")

    def __init__(self) -> None:
        self.url = b""
        self.method = ""
        self.headers: dict[str, str] = {}
        self.body = bytearray()


class _Connection(asyncio.Protocol):
    """Parses requests as they arrive and answers them one after another, in order."""

    def __init__(self, server: HttpAuthorization) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()  # built by the server's loop, for each connection
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._current = _Request()
        self._queue: deque[_Request] = deque()
        self._busy = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tls = self._server.tls
        if tls is not None and not tls.admits(transport.get_extra_info("peercert")):
            transport.close()  # a certificate from the CA, but not of a client we serve
            return
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, ValueError):
            self._refuse()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._queue.clear()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._current = _Request()

    def on_url(self, url: bytes) -> None:
        self._current.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers = self._current.headers
        headers[key] = f"{headers[key]},{text}" if key in headers else text

    def on_headers_complete(self) -> None:
        declared = self._current.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > MAX_BODY_BYTES:
            raise ValueError("body too large")  # surfaces from feed_data: a 400

    def on_body(self, body: bytes) -> None:
        current = self._current
        if len(current.body) + len(body) > MAX_BODY_BYTES:
            raise ValueError("body too large")  # surfaces from feed_data: a 400
        current.body += body

    def on_message_complete(self) -> None:
        request = self._current
        request.method = self._parser.get_method().decode("latin-1")
        self._queue.append(request)
        if not self._busy:
            self._busy = True
            self._loop.create_task(self._answer_all())

    async def _answer_all(self) -> None:
        try:
            while self._queue:
                request = self._queue.popleft()
                try:
                    reply = await self._server.answer(request)
                except Exception as exc:
                    log.error(
                        "answering %s failed: %s: a 500", _target(request), type(exc).__name__
                    )
                    reply = _INTERNAL_ERROR
                if self._transport is None:
                    return
                self._transport.write(reply)
        finally:
            self._busy = False

    def _refuse(self) -> None:
        if self._transport is not None:
            self._transport.write(_BAD_REQUEST)
            self._transport.close()
        self._queue.clear()


def _target(request: _Request) -> str:
    """The request's path for a log line: up to its query, at most 64 characters, printable."""
    path = request.url.split(b"?", 1)[0][:64].decode("ascii", "replace")
    return "".join(c if c.isprintable() else "?" for c in path)


class HttpAuthorization:
    """The asyncio server: one ``_Connection`` per connection, decisions from ``authz``."""

    def __init__(
        self,
        authz: AuthorizationService,
        settle: HttpSettle | None = None,
        tls: HttpTls | None = None,
    ) -> None:
        self._authz = authz
        self._settle = settle
        self.tls = tls
        self.hide_usage = False  # accounting.hide_injected_usage
        self._server: asyncio.AbstractServer | None = None
        self.serving = True
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        context = self.tls.context() if self.tls is not None else None
        self._server = await loop.create_server(lambda: _Connection(self), host, port, ssl=context)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def answer(self, request: _Request) -> bytes:
        """The reply to one request; a defined answer whatever it holds."""
        target = request.url.decode("latin-1")
        if not target.startswith(CHECK_PREFIX):
            if target == HEALTH_PATH:
                return _SERVING if self.serving else _DRAINING
            if target == SETTLE_PATH and request.method == "POST" and self._settle is not None:
                headers = request.headers
                return await self._settle.answer(
                    headers.get(STATUS_HEADER, ""),
                    bytes(request.body),
                    headers.get(BYTES_HEADER, ""),
                    headers.get(BODY_TYPE_HEADER),
                    headers.get(BODY_ENCODING_HEADER, ""),
                )
            return replies.http_response(404, [])
        path = target[len(CHECK_PREFIX) :] or "/"
        admission = AdmissionRequest(request.method, path, request.headers, bytes(request.body))
        decision = await self._authz.decision(admission, path.split("?", 1)[0])
        try:
            # The normalized path names the model route.
            return replies.http_reply(
                decision, decision.path, self._authz.policy, hide_usage=self.hide_usage
            )
        except Exception as exc:
            return replies.http_reply(self._authz.internal_error(exc), "")
