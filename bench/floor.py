"""A do-nothing sidecar: the floor that grpc.aio (or HTTP for ext_authz) itself costs per request.

It answers every Check with OK and every ext_proc message with a plain "continue", reads access
log batches and acts on none, and (lean layout) admits every HTTP check, as the real sidecar does
on the same topology, but runs no admission, no accounting and no store. The
difference between its CPU per request and the sidecar's is what our own code costs.
Started by the harness in the sidecar's place (``LocalStack.sidecar_command``).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import grpc
import httptools
import uvloop
from envoy.service.accesslog.v3 import als_pb2 as als
from envoy.service.accesslog.v3 import als_pb2_grpc as als_grpc
from envoy.service.auth.v3 import external_auth_pb2 as authz
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.rpc import code_pb2, status_pb2

_ALS_DONE = als.StreamAccessLogsResponse()
_HTTP_OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
_OK = authz.CheckResponse(
    status=status_pb2.Status(code=code_pb2.OK), ok_response=authz.OkHttpResponse()
)
_REPLIES = {
    "request_headers": ep.ProcessingResponse(request_headers=ep.HeadersResponse()),
    "response_headers": ep.ProcessingResponse(response_headers=ep.HeadersResponse()),
    "request_body": ep.ProcessingResponse(request_body=ep.BodyResponse()),
    "response_body": ep.ProcessingResponse(response_body=ep.BodyResponse()),
    "request_trailers": ep.ProcessingResponse(request_trailers=ep.TrailersResponse()),
    "response_trailers": ep.ProcessingResponse(response_trailers=ep.TrailersResponse()),
}


_Servicers = (
    authz_grpc.AuthorizationServicer,
    ep_grpc.ExternalProcessorServicer,
    als_grpc.AccessLogServiceServicer,
)


class Floor(*_Servicers):  # type: ignore[misc]
    async def Check(  # noqa: N802
        self, request: authz.CheckRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> authz.CheckResponse:
        return _OK

    async def Process(  # noqa: N802
        self,
        requests: AsyncIterator[ep.ProcessingRequest],
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[ep.ProcessingResponse]:
        async for request in requests:
            kind = request.WhichOneof("request")
            if not request.observability_mode:
                yield _REPLIES[kind or "response_body"]
            if kind == "response_body" and request.response_body.end_of_stream:
                break

    async def StreamAccessLogs(  # noqa: N802
        self,
        requests: AsyncIterator[als.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[object, object],
    ) -> als.StreamAccessLogsResponse:
        async for _ in requests:  # read every batch, act on none
            pass
        return _ALS_DONE


class HttpFloor(asyncio.Protocol):
    """ext_authz over HTTP that admits everything: parsed with httptools as the sidecar parses."""

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_message_complete(self) -> None:
        if self._transport is not None:
            self._transport.write(_HTTP_OK)


async def serve(port: int, http_port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    floor = Floor()
    authz_grpc.add_AuthorizationServicer_to_server(floor, server)
    ep_grpc.add_ExternalProcessorServicer_to_server(floor, server)
    als_grpc.add_AccessLogServiceServicer_to_server(floor, server)
    if http_port:  # the lean layout asks admission over HTTP
        await asyncio.get_running_loop().create_server(HttpFloor, "127.0.0.1", http_port)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    http = int(os.environ.get("MAAS_EXTPROC_SERVER_AUTHZ_HTTP_PORT", "0"))
    uvloop.run(serve(int(os.environ["MAAS_EXTPROC_SERVER_PORT"]), http))
