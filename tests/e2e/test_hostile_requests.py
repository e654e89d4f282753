"""Hostile request shapes through the real Envoy: every one is charged, or refused, never served free."""

from __future__ import annotations

import http.client
import json
import socket
import uuid

import pytest

from extproc.stack import LocalStack
from tests.e2e.support import ledger_tokens, sim_records
from tests.helpers import CHAT, KEYS

SERVED, BAD_PATH, UNKNOWN = 200, 400, 404
# Each spelling of the chat route, and what it must get. The simulator reads paths as the most
# lenient servers do (x-sim-lenient-path), so whatever reaches it is served.
VARIANTS = [
    (CHAT, SERVED),
    (CHAT.replace("completions", "completion%73"), SERVED),
    (CHAT.replace("completions", "c%6Fmpletions"), SERVED),  # upper- and lower-case escapes
    (CHAT.replace("completions", "c%6fmpletions"), SERVED),
    (CHAT + "/", SERVED),
    (CHAT.replace("/v1/", "//v1/"), SERVED),
    (CHAT.replace("/chat/", "//chat/"), SERVED),
    (CHAT.replace("/chat/", "/./chat/"), SERVED),
    (CHAT.replace("/chat/", "/models/../chat/"), SERVED),
    (CHAT.replace("/chat/", "/chat/%2e%2e/chat/"), SERVED),
    (CHAT + ";x", SERVED),
    (CHAT.replace("/completions", ";v=1/completions;jsessionid=2"), SERVED),
    (CHAT.replace("chat/", "chat%2F"), BAD_PATH),  # escaped slashes: refused by Envoy
    (CHAT.replace("chat/", "chat%2f"), BAD_PATH),
    (CHAT.replace("chat/", "chat%5C"), BAD_PATH),
    (CHAT + "z", UNKNOWN),  # under the model prefix, but no route of ours: refused
    ("/v1/invocations", UNKNOWN),
]


def send(
    stack: LocalStack, method: str, path: str, model: str, **headers: str
) -> tuple[int, bytes]:
    """One request with the path exactly as given (http.client does not normalize it)."""
    connection = http.client.HTTPConnection("127.0.0.1", stack.listen_port, timeout=10)
    body = json.dumps(
        {"model": model, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    )
    connection.request(
        method,
        path,
        body=body,
        headers={
            "Authorization": f"Bearer {KEYS['premium']}",
            "Content-Type": "application/json",
            "x-sim-lenient-path": "1",
            **headers,
        },
    )
    response = connection.getresponse()
    try:
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize(("path", "expected"), VARIANTS, ids=[p for p, _ in VARIANTS])
def test_every_spelling_of_a_model_path_is_charged_or_refused(
    stack: LocalStack, path: str, expected: int
) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    status, body = send(stack, "POST", path, model)
    served = [r for r in sim_records(stack) if r["model"] == model]
    charged = ledger_tokens(stack, model)
    assert status == expected, body
    if expected == SERVED:
        (record,) = served
        assert record["status"] == 200
        assert charged == record["total_tokens"] > 0
    else:
        assert served == [], "a refused request never reaches the model"
        assert charged == 0
        if expected == UNKNOWN:  # ours, OpenAI-shaped; Envoy's own 400 is plain text
            assert json.loads(body)["error"]["code"] == "unknown_route"


def test_a_charged_path_with_another_method_is_refused(stack: LocalStack) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    status, body = send(stack, "GET", CHAT, model)
    assert status == UNKNOWN, body
    assert [r for r in sim_records(stack) if r["model"] == model] == []


def test_header_names_with_underscores_never_reach_the_model(stack: LocalStack) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    status, body = send(
        stack, "POST", CHAT, model, X_MaaS_Username="admin", X_MaaS_Tier="enterprise"
    )
    assert status == SERVED, body
    (record,) = [r for r in sim_records(stack) if r["model"] == model]
    headers = record["headers"]
    assert isinstance(headers, dict)
    assert not [name for name in headers if "_" in name], headers
    assert headers["x-maas-username"] == "bob"  # ours, from the token
    assert headers["x-maas-tier"] == "premium"
    assert ledger_tokens(stack, model) == record["total_tokens"]


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, read until Envoy closes the connection (it does after these errors)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


MALFORMED = [
    (
        "a 100 KB bearer token",
        b"POST "
        + CHAT.encode()
        + b" HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
        + b"a" * 100_000
        + b"\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 431 ",
    ),
    (
        "200 headers",
        b"POST "
        + CHAT.encode()
        + b" HTTP/1.1\r\nHost: gw\r\n"
        + b"".join(b"X-Filler-%d: v\r\n" % i for i in range(200))
        + b"Content-Length: 0\r\n\r\n",
        b"HTTP/1.1 431 ",
    ),
    (
        "a lowercase method",
        b"post " + CHAT.encode() + b" HTTP/1.1\r\nHost: gw\r\n\r\n",
        b"HTTP/1.1 400 ",
    ),
]


@pytest.mark.parametrize(
    ("what", "request_bytes", "status_line"), MALFORMED, ids=[m[0] for m in MALFORMED]
)
def test_malformed_requests_get_envoys_own_answer_not_a_closed_connection(
    stack: LocalStack, what: str, request_bytes: bytes, status_line: bytes
) -> None:
    answer = raw_exchange(stack.listen_port, request_bytes)
    assert answer.startswith(status_line), f"{what}: {answer[:200]!r}"
