"""Every Check gets a defined answer: 400 for bad client numbers, 500 for a bug of ours, never a
broken RPC, never a traceback in the log (the sidecar's gRPC server, driven by a grpc.aio client)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.service.auth.v3 import attribute_context_pb2 as ac
from envoy.service.auth.v3 import external_auth_pb2 as authz
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc

from extproc.admission import Admission
from extproc.app import Server, Sidecar
from extproc.authz.base import AllowAll
from extproc.authz.tiers import FileTiers
from extproc.domain import Identity
from extproc.envoy.authz_service import AuthorizationService
from extproc.limits.limiter import Limiter
from extproc.observability.metrics import Metrics
from extproc.routes import RouteTable
from extproc.store.memory import MemoryStore
from tests.helpers import CHAT, KEYS, Clock, local_config

HOSTILE_BODIES = {
    "max_tokens 10**30": b'{"model":"m","max_tokens":' + str(10**30).encode() + b"}",
    "max_tokens 10**400": b'{"model":"m","max_tokens":' + str(10**400).encode() + b"}",
    "max_tokens 1e400": b'{"model":"m","max_tokens":1e400}',
    "max_tokens 1.5": b'{"model":"m","max_tokens":1.5}',
    'max_tokens "10"': b'{"model":"m","max_tokens":"10"}',
    "max_completion_tokens true": b'{"model":"m","max_completion_tokens":true}',
    "max_output_tokens -1": b'{"model":"m","max_output_tokens":-1}',
    "20,000 levels": b'{"model":"m","messages":' + b"[" * 20_000 + b"]" * 20_000 + b"}",
}


def check_request(token: str, body: bytes) -> authz.CheckRequest:
    headers = {"content-type": "application/json", "authorization": f"Bearer {token}"}
    http = ac.AttributeContext.HttpRequest(method="POST", path=CHAT, headers=headers, raw_body=body)
    return authz.CheckRequest(
        attributes=ac.AttributeContext(request=ac.AttributeContext.Request(http=http))
    )


def tracebacks(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.exc_info is not None or r.exc_text]


@pytest.fixture
async def sidecar() -> AsyncIterator[tuple[Sidecar, grpc.aio.Channel]]:
    built = Sidecar.build(local_config())
    server = Server(built, "127.0.0.1", 0)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield built, channel
    await server.stop(1)


@pytest.mark.parametrize("name", list(HOSTILE_BODIES))
async def test_hostile_client_numbers_get_a_400_invalid_request_error(
    sidecar: tuple[Sidecar, grpc.aio.Channel], caplog: pytest.LogCaptureFixture, name: str
) -> None:
    built, channel = sidecar
    caplog.set_level(logging.INFO)
    check = authz_grpc.AuthorizationStub(channel).Check
    reply = await check(check_request(KEYS["free"], HOSTILE_BODIES[name]))
    assert reply.denied_response.status.code == 400
    error = json.loads(reply.denied_response.body)["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "bad_request"
    assert tracebacks(caplog.records) == []
    assert built.metrics.requests.labels("bad_request", "free")._value.get() == 1
    # No reservation was taken: the free tier's 100 tokens are all still there.
    assert (await check(check_request(KEYS["free"], b'{"model":"m","max_tokens":99}'))).ok_response


class FailingIdentities:
    """An identity source whose backend fails in a way nobody planned for (not ``Unavailable``)."""

    async def authenticate(self, token: str) -> Identity | None:
        raise KeyError(f"no such field in the answer for {token}")

    async def close(self) -> None:
        return None


async def test_an_unexpected_exception_is_a_500_in_one_log_line_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = local_config()
    metrics = Metrics()
    admission = Admission(
        RouteTable(config.routes),
        FailingIdentities(),
        FileTiers.from_file(config.path(config.tiers.file), config.tiers.instance),
        AllowAll(),
        Limiter(MemoryStore(), config.limits, Clock()),
    )
    server = grpc.aio.server()
    authz_grpc.add_AuthorizationServicer_to_server(AuthorizationService(admission, metrics), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    caplog.set_level(logging.INFO)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await authz_grpc.AuthorizationStub(channel).Check(
                check_request("secret-token-value", b"{}")
            )
    finally:
        await server.stop(0)
    assert reply.denied_response.status.code == 500
    assert json.loads(reply.denied_response.body)["error"]["type"] == "server_error"
    assert tracebacks(caplog.records) == []
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["check failed: internal error KeyError"]
    assert "secret-token-value" not in caplog.text
    assert metrics.internal_errors.labels("check")._value.get() == 1
    assert metrics.requests.labels("internal_error", "")._value.get() == 1
