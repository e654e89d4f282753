"""A charge that is known is never lost: the settle outlives the stream, a stall, and a stop.

The sidecar's gRPC server runs in-process with a real Redis store, driven by a real grpc.aio
client as Envoy drives it. Redis is frozen with SIGSTOP while the last reply is pending, and the
stream is then reset the way Envoy resets it once it has its last reply.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from extproc.app import Server, Sidecar
from extproc.config import Secret, StoreConfig
from extproc.store.redis import RedisStore
from tests.helpers import KEYS, local_config
from tests.integration.test_grpc_services import SSE, body, check_request, response_headers
from tests.redis_fixtures import RedisServer

pytestmark = pytest.mark.redis


def today() -> str:
    return dt.datetime.now(tz=dt.UTC).strftime("%Y%m%d")


@pytest.fixture
async def server(own_redis_server: RedisServer) -> AsyncIterator[Server]:
    config = local_config(
        {"MAAS_EXTPROC_STORE_URL": own_redis_server.url, "MAAS_EXTPROC_STORE_TIMEOUT_S": "5"}
    )
    sidecar = Sidecar.build(config)
    await sidecar.start()
    srv = Server(sidecar, "127.0.0.1", 0)
    await srv.start()
    yield srv
    await srv.stop(1)


def freeze(redis: RedisServer) -> None:
    assert redis.process is not None
    os.kill(redis.process.pid, signal.SIGSTOP)


def thaw(redis: RedisServer) -> None:
    assert redis.process is not None
    os.kill(redis.process.pid, signal.SIGCONT)


async def bob_rows(server: Server) -> list[tuple[int, int, int]]:
    rows = await server.sidecar.store.ledger("bob", [today()])
    return [(r.total_tokens, r.requests, r.unsettled_requests) for r in rows]


async def settled(server: Server, expected: list[tuple[int, int, int]]) -> None:
    for _ in range(250):
        if await bob_rows(server) == expected:
            return
        await asyncio.sleep(0.02)
    assert await bob_rows(server) == expected


async def test_a_reset_right_after_the_last_reply_loses_no_charge(
    server: Server, own_redis_server: RedisServer
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        allowed = await authz_grpc.AuthorizationStub(channel).Check(check_request(KEYS["premium"]))
        queue: asyncio.Queue[ep.ProcessingRequest] = asyncio.Queue()

        async def requests() -> AsyncIterator[ep.ProcessingRequest]:
            while True:
                yield await queue.get()

        call = ep_grpc.ExternalProcessorStub(channel).Process(requests())
        await queue.put(response_headers(200, "text/event-stream", allowed.dynamic_metadata))
        await call.read()
        freeze(own_redis_server)  # the settle will hang on Redis
        try:
            await queue.put(body(SSE, end=True))
            reply = await asyncio.wait_for(call.read(), 5)  # not held back by the frozen store
            assert reply.HasField("response_body")
            call.cancel()  # Envoy resets the stream once it has its last reply
            await asyncio.sleep(0.3)
        finally:
            thaw(own_redis_server)
    await settled(server, [(7, 1, 0)])


async def test_a_stop_waits_for_settles_still_running(
    server: Server, own_redis_server: RedisServer
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        allowed = await authz_grpc.AuthorizationStub(channel).Check(check_request(KEYS["premium"]))
        freeze(own_redis_server)
        try:
            messages = [
                response_headers(200, "text/event-stream", allowed.dynamic_metadata),
                body(SSE, end=True),
            ]
            call = ep_grpc.ExternalProcessorStub(channel).Process(iter(messages))
            assert len([reply async for reply in call]) == 2
            assert server.sidecar.charger.pending == 1
            asyncio.get_running_loop().call_later(0.5, thaw, own_redis_server)
            await server.stop(1)  # returns only once the settle has landed
        finally:
            thaw(own_redis_server)
    assert server.sidecar.charger.pending == 0
    assert server.sidecar.store.spooled == 0
    fresh = RedisStore.from_config(StoreConfig(url=Secret(own_redis_server.url)))
    try:
        rows = await fresh.ledger("bob", [today()])
    finally:
        await fresh.close()
    assert [(r.total_tokens, r.requests, r.unsettled_requests) for r in rows] == [(7, 1, 0)]
