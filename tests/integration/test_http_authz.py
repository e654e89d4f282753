"""ext_authz over HTTP in-process: requests as Envoy's HTTP ext_authz client sends them, raw bytes
on a socket (api/envoy/extensions/filters/http/ext_authz/v3/ext_authz.proto, ``http_service``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from google.protobuf import struct_pb2

from extproc.app import Server, Sidecar
from extproc.envoy import handover
from extproc.stack import free_port
from tests.helpers import CHAT, KEYS, local_config


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    port = free_port()
    config = local_config({"MAAS_EXTPROC_SERVER_AUTHZ_HTTP_PORT": str(port)})
    srv = Server(Sidecar.build(config), "127.0.0.1", 0)
    await srv.start()
    yield srv
    await srv.stop(1)


def check(token: str | None, body: bytes, *extra: str, path: str = CHAT) -> bytes:
    """A check as Envoy sends it: the client's method and path behind /check, its headers."""
    lines = [f"POST /check{path} HTTP/1.1", "host: gateway", "content-type: application/json"]
    if token:
        lines.append(f"authorization: Bearer {token}")
    lines += [*extra, f"content-length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def exchange(server: Server, *requests: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Send ``requests`` on one connection (pipelined), read one reply per request."""
    assert server.http_authz is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", server.http_authz.port)
    writer.write(b"".join(requests))
    replies = []
    for _ in requests:
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")[:-2]
        headers = dict(line.split(": ", 1) for line in header_lines)
        body = await reader.readexactly(int(headers["content-length"]))
        replies.append((int(status_line.split()[1]), headers, body))
    writer.close()
    return replies


async def test_admitted_checks_carry_identity_removals_and_the_billing_record(
    server: Server,
) -> None:
    body = b'{"model": "m", "max_tokens": 8, "stream": true}'
    spoof = "x-maas-tier: enterprise"
    ((status, headers, _),) = await exchange(server, check(KEYS["premium"], body, spoof))
    assert status == 200
    assert (headers["x-maas-username"], headers["x-maas-tier"]) == ("bob", "premium")
    assert headers["x-maas-inject"] == "1"
    assert set(headers["x-envoy-auth-headers-to-remove"].split(",")) == {"accept-encoding"}
    assert int(headers["x-ratelimit-limit"]) > 0
    # What Envoy makes of the header (dynamic_metadata_from_headers) is what the access log reads.
    metadata = struct_pb2.Struct()
    metadata.fields[handover.BILLING_HEADER].string_value = headers[handover.BILLING_HEADER]
    billing = handover.read({handover.METADATA_NAMESPACE: metadata})
    assert billing is not None
    assert (billing.userid, billing.model, billing.inject) == ("bob", "m", True)
    assert billing.reserved >= 8


async def test_refusals_carry_status_headers_and_an_openai_error(server: Server) -> None:
    replies = await exchange(
        server, check(None, b"{}"), check(KEYS["premium"], b'{"max_tokens":-1}')
    )
    (unauth, headers, body), (bad, _, bad_body) = replies
    assert unauth == 401
    assert headers["www-authenticate"] == 'Bearer realm="maas"'
    assert json.loads(body)["error"]["code"] == "unauthenticated"
    assert bad == 400
    assert json.loads(bad_body)["error"]["code"] == "bad_request"


async def test_health_answers_and_other_paths_are_not_checks(server: Server) -> None:
    get = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"
    other = b"GET /elsewhere HTTP/1.1\r\nhost: x\r\n\r\n"
    (health, _, _), (elsewhere, _, _) = await exchange(server, get, other)
    assert (health, elsewhere) == (200, 404)
    await server.not_serving()
    ((draining, _, _),) = await exchange(server, get)
    assert draining == 503


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",  # TLS hello
        b"POST /check/x HTTP/1.1\r\ncontent-length: 99999999999\r\n\r\nabc",
        b"GET / HTTP/1.1\r\nbad header line\r\n\r\n",
    ],
)
async def test_what_is_not_http_gets_a_400_and_the_connection_closes(
    server: Server, garbage: bytes
) -> None:
    assert server.http_authz is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", server.http_authz.port)
    writer.write(garbage)
    reply = await asyncio.wait_for(reader.read(), 5)  # read() returns at the close
    writer.close()
    assert reply.startswith(b"HTTP/1.1 400 ")


async def test_a_failure_while_answering_is_a_500_and_the_connection_goes_on(
    server: Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Fault injected into the settle (a bug of ours): one log line, a 500 for that request,
    and the request pipelined behind it is still answered."""
    assert server.http_authz is not None

    async def broken(*_: object) -> bytes:
        raise RuntimeError("injected")

    monkeypatch.setattr(server.http_authz._settle, "answer", broken)
    settle = b"POST /settle HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\nx"
    health = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"
    replies = await asyncio.wait_for(exchange(server, settle, health), 10)  # before: no answer
    (first, _, _), (second, _, _) = replies
    assert (first, second) == (500, 200)
    lines = [r.getMessage() for r in caplog.records if r.name == "extproc.authz.http"]
    assert lines == ["answering /settle failed: RuntimeError: a 500"]
