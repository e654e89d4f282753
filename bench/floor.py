"""A do-nothing ext_authz + ext_proc server: the floor that grpc.aio itself costs per request.

It answers every Check with OK and every ext_proc message with a plain "continue", as the real
sidecar does on the same topology, but runs no admission, no accounting and no store. The
difference between its CPU per request and the sidecar's is what our own code costs.
Started by the harness in the sidecar's place (``LocalStack.sidecar_command``).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import grpc
import uvloop
from envoy.service.auth.v3 import external_auth_pb2 as authz
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.rpc import code_pb2, status_pb2

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


class Floor(authz_grpc.AuthorizationServicer, ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
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


async def serve(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    floor = Floor()
    authz_grpc.add_AuthorizationServicer_to_server(floor, server)
    ep_grpc.add_ExternalProcessorServicer_to_server(floor, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    uvloop.run(serve(int(os.environ["MAAS_EXTPROC_SERVER_PORT"])))
