"""The sidecar's gRPC server in-process, driven by a real grpc.aio client as Envoy would drive it."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.auth.v3 import attribute_context_pb2 as ac
from envoy.service.auth.v3 import external_auth_pb2 as authz
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from extproc.app import Server, Sidecar
from extproc.envoy.replies import METADATA_NAMESPACE
from tests.helpers import CHAT, KEYS, local_config

SSE = (
    b'data: {"choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\n\n'
    b"data: [DONE]\n\n"
)


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    sidecar = Sidecar.build(local_config())
    srv = Server(sidecar, "127.0.0.1", 0)
    await srv.start()
    yield srv
    await srv.stop(1)


@pytest.fixture
async def channel(server: Server) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        yield chan


def check_request(token: str | None, body: bytes = b'{"model":"m","max_tokens":8}') -> object:
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    http = ac.AttributeContext.HttpRequest(method="POST", path=CHAT, headers=headers, raw_body=body)
    return authz.CheckRequest(
        attributes=ac.AttributeContext(request=ac.AttributeContext.Request(http=http))
    )


def response_headers(status: int, content_type: str, meta: object | None) -> ep.ProcessingRequest:
    headers = base_pb2.HeaderMap(
        headers=[
            base_pb2.HeaderValue(key=":status", raw_value=str(status).encode()),
            base_pb2.HeaderValue(key="content-type", raw_value=content_type.encode()),
        ]
    )
    request = ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=headers))
    if meta is not None:
        request.metadata_context.filter_metadata[METADATA_NAMESPACE].CopyFrom(meta)
    return request


def body(chunk: bytes, end: bool = False) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(response_body=ep.HttpBody(body=chunk, end_of_stream=end))


def today() -> str:
    return dt.datetime.now(tz=dt.UTC).strftime("%Y%m%d")


async def test_check_then_stream_charges_the_reported_usage(
    server: Server, channel: grpc.aio.Channel
) -> None:
    check = authz_grpc.AuthorizationStub(channel).Check
    allowed = await check(check_request(KEYS["premium"]))
    assert allowed.status.code == 0
    messages = [
        response_headers(200, "text/event-stream", allowed.dynamic_metadata),
        *(body(SSE[i : i + 7]) for i in range(0, len(SSE), 7)),
        body(b"", end=True),
    ]
    call = ep_grpc.ExternalProcessorStub(channel).Process(iter(messages))
    replies = [reply async for reply in call]
    assert len(replies) == len(messages)  # one reply per message in STREAMED mode
    rows = await server.sidecar.store.ledger("bob", [today()])
    assert [(r.model, r.prompt_tokens, r.completion_tokens, r.total_tokens) for r in rows] == [
        ("m", 3, 4, 7)
    ]


async def test_denied_request_stream_is_never_billed(
    server: Server, channel: grpc.aio.Channel
) -> None:
    denied = await authz_grpc.AuthorizationStub(channel).Check(check_request("bogus"))
    assert denied.denied_response.status.code == 401
    # Envoy opens an ext_proc stream for the local reply, without ext_authz metadata.
    messages = [response_headers(401, "application/json", None), body(b"{}", end=True)]
    call = ep_grpc.ExternalProcessorStub(channel).Process(iter(messages))
    replies = [reply async for reply in call]
    assert replies[0].HasField("mode_override")  # we stop following the body
    assert replies[0].mode_override.response_body_mode == pm.ProcessingMode.NONE
    assert await server.sidecar.store.ledger_users([today()]) == []


async def test_cancelled_stream_still_settles_its_charge(
    server: Server, channel: grpc.aio.Channel
) -> None:
    allowed = await authz_grpc.AuthorizationStub(channel).Check(check_request(KEYS["premium"]))
    queue: asyncio.Queue[ep.ProcessingRequest] = asyncio.Queue()

    async def requests() -> AsyncIterator[ep.ProcessingRequest]:
        while True:
            yield await queue.get()

    call = ep_grpc.ExternalProcessorStub(channel).Process(requests())
    await queue.put(response_headers(200, "text/event-stream", allowed.dynamic_metadata))
    await call.read()
    await queue.put(body(SSE))  # usage seen, but end of stream never comes
    await call.read()
    call.cancel()
    for _ in range(100):
        rows = await server.sidecar.store.ledger("bob", [today()])
        if rows and rows[0].requests:
            break
        await asyncio.sleep(0.02)
    assert [(r.total_tokens, r.requests, r.unsettled_requests) for r in rows] == [(7, 1, 0)]
    assert server.sidecar.metrics.disconnects.labels("premium")._value.get() == 1
    assert server.sidecar.charger.pending == 0  # no task outlives its charge


async def test_health_and_reflection(server: Server, channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "envoy.service.auth.v3.Authorization"):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name async for r in call for s in r.list_services_response.service}
    assert {
        "envoy.service.auth.v3.Authorization",
        "envoy.service.ext_proc.v3.ExternalProcessor",
        "grpc.health.v1.Health",
    } <= names


async def test_a_second_server_cannot_share_the_port(server: Server) -> None:
    with pytest.raises((OSError, RuntimeError)):
        Server(Sidecar.build(local_config()), "127.0.0.1", server.port)
