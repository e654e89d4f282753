"""Fuzzing the running sidecar through its gRPC and HTTP entry points with hostile input.

Invariants, for every example: a defined answer (an HTTP status from a known set, an ext_proc
stream that ends cleanly), no traceback in any log, and no counter lowered by a request: the
ledger never decreases and a token window never ends below its value before the request was
admitted (the reservation is swapped for the charge, never for less than nothing).
"""

from __future__ import annotations

import json
import logging
import urllib.parse

import aiohttp
import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2 as ac
from envoy.service.auth.v3 import external_auth_pb2 as authz
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import struct_pb2
from hypothesis import event, given
from hypothesis import strategies as st
from yarl import URL

from extproc.config import DEFAULT_MAX_REQUEST_TOKENS
from extproc.envoy.replies import METADATA_NAMESPACE
from tests.fuzz import strategies as hs
from tests.fuzz.conftest import CHECK_STATUSES, Running, tracebacks
from tests.fuzz.profile import FUZZ
from tests.helpers import CHAT, KEYS


def check_request(
    method: str, path: str, headers: dict[str, str], body: bytes
) -> authz.CheckRequest:
    http = ac.AttributeContext.HttpRequest(method=method, path=path, headers=headers, raw_body=body)
    return authz.CheckRequest(
        attributes=ac.AttributeContext(request=ac.AttributeContext.Request(http=http))
    )


def status_of(reply: authz.CheckResponse) -> int:
    if reply.HasField("ok_response"):
        assert reply.status.code == 0
        return 200
    return int(reply.denied_response.status.code)


def header_map(**values: str) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()]
    )


def response_headers(
    status: int, content_type: str, encoding: str, meta: struct_pb2.Struct | None
) -> ep.ProcessingRequest:
    values = {":status": str(status), "content-type": content_type}
    if encoding:
        values["content-encoding"] = encoding
    request = ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=header_map(**values)))
    if meta is not None:
        request.metadata_context.filter_metadata[METADATA_NAMESPACE].CopyFrom(meta)
    return request


def body_message(chunk: bytes, end: bool = False) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(response_body=ep.HttpBody(body=chunk, end_of_stream=end))


# Messages Envoy may send at odd moments (or a broken peer at any moment).
STRAYS = (
    ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=header_map(**{":path": CHAT}))),
    ep.ProcessingRequest(request_body=ep.HttpBody(body=b'{"stream":true}', end_of_stream=True)),
    ep.ProcessingRequest(request_trailers=ep.HttpTrailers()),
    ep.ProcessingRequest(response_trailers=ep.HttpTrailers()),
    ep.ProcessingRequest(),
    body_message(b"\x00\xff garbage"),
)


async def process(running: Running, messages: list[ep.ProcessingRequest]) -> None:
    """Run one ext_proc stream to its end; a broken RPC fails the property."""
    call = ep_grpc.ExternalProcessorStub(running.channel).Process(iter(messages))
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as error:
        pytest.fail(f"ext_proc stream broke: {error.code()} {error.details()}")


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO)
    return caplog


@FUZZ
@given(
    method=hs.methods,
    path=hs.paths,
    headers=hs.check_headers,
    body=hs.request_bodies,
    answer=hs.response_bodies(),
    status=st.sampled_from((200, 200, 400, 500)),
    encoding=st.sampled_from(("", "", "gzip", "br", "deflate")),
    cuts=st.lists(st.integers(0, 10_000), max_size=6),
    strays=st.lists(st.tuples(st.integers(0, 20), st.sampled_from(STRAYS)), max_size=3),
    complete=st.booleans(),
)
async def test_a_request_end_to_end_gets_a_defined_answer_and_lowers_no_counter(
    running: Running,
    logs: pytest.LogCaptureFixture,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    answer: tuple[str, bytes],
    status: int,
    encoding: str,
    cuts: list[int],
    strays: list[tuple[int, ep.ProcessingRequest]],
    complete: bool,
) -> None:
    seen = len(logs.records)
    before = await running.counters()
    reply = await authz_grpc.AuthorizationStub(running.channel).Check(
        check_request(method, path, headers, body)
    )
    assert status_of(reply) in CHECK_STATUSES
    event(f"check {status_of(reply)}")
    meta = reply.dynamic_metadata if reply.HasField("dynamic_metadata") else None
    content_type, payload = answer
    chunks = hs.split(hs.encode(payload, encoding), cuts)
    messages = [
        response_headers(status, content_type, encoding, meta),
        *(body_message(chunk) for chunk in chunks),
    ]
    if complete:
        messages.append(body_message(b"", end=True))
    for at, stray in strays:
        messages.insert(1 + at % len(messages), stray)
    await process(running, messages)
    after = await running.counters()
    assert after.not_lowered_from(before) == []
    for user, total in after.ledger.items():  # no single charge is unbounded
        assert total - before.ledger[user] <= 2 * DEFAULT_MAX_REQUEST_TOKENS
    assert tracebacks(logs.records[seen:]) == []


async def charge(running: Running, body: bytes, status: int, answer: bytes) -> int:
    """One premium request through Check and Process; its HTTP status from Check."""
    headers = {"authorization": f"Bearer {KEYS['premium']}"}
    reply = await authz_grpc.AuthorizationStub(running.channel).Check(
        check_request("POST", CHAT, headers, body)
    )
    if reply.HasField("ok_response"):
        await process(
            running,
            [
                response_headers(status, "application/json", "", reply.dynamic_metadata),
                body_message(answer, end=True),
            ],
        )
    return status_of(reply)


USAGE_20 = b'{"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":10,"total_tokens":20}}'


@FUZZ
@given(
    literal=st.sampled_from(hs.HOSTILE_NUMBERS),
    field=st.sampled_from(("max_tokens", "max_completion_tokens", "max_output_tokens")),
    upstream=st.sampled_from(((400, b'{"error":{"message":"no"}}'), (200, USAGE_20))),
)
async def test_hostile_bounds_never_lower_a_window_nor_lock_it(
    running: Running,
    logs: pytest.LogCaptureFixture,
    literal: str,
    field: str,
    upstream: tuple[int, bytes],
) -> None:
    """The issue's attack with every hostile literal, after a charge the window could lose."""
    seen = len(logs.records)
    assert await charge(running, b'{"model":"m","max_tokens":20}', 200, USAGE_20) == 200
    before = await running.counters()
    body = f'{{"model":"m","{field}":{literal}}}'.encode()
    assert await charge(running, body, *upstream) in {200, 400}
    after = await running.counters()
    assert after.not_lowered_from(before) == []
    assert await charge(running, b'{"model":"m","max_tokens":1}', 200, USAGE_20) == 200
    assert tracebacks(logs.records[seen:]) == []


_PARAMS = (
    *("user", "from", "to", "group_by", "format", "x", ""),
    *("model", "subscription", "key", "user_prefix", "sort", "order", "limit", "page_token"),
)
_VALUES = st.one_of(
    st.sampled_from(("2025-03-01", "2025-02-30", "day", "model", "csv", "json", "alice", "bob")),
    st.sampled_from(("total_tokens", "user", "desc", "0", "1000", "1001", "-1", "W10", "e30=")),
    st.text(max_size=20),
    st.integers().map(str),
)


@FUZZ
@given(
    pairs=st.lists(st.tuples(st.sampled_from(_PARAMS), _VALUES), max_size=5),
    raw_tail=st.text(max_size=20),
    route=st.sampled_from(
        ("/v1/usage", "/v1/usage/users", "/v1/usage/keys", "/v1/usage/openapi.json")
    ),
    auth=st.sampled_from(("Bearer demo-premium-key", "Bearer demo-admin-key", "Bearer x", "")),
)
async def test_usage_api_query_strings_get_a_defined_answer(
    running: Running,
    logs: pytest.LogCaptureFixture,
    pairs: list[tuple[str, str]],
    raw_tail: str,
    route: str,
    auth: str,
) -> None:
    seen = len(logs.records)
    query = urllib.parse.urlencode(pairs) + "&" + urllib.parse.quote(raw_tail, safe="=&%")
    url = URL(f"{running.usage_url}{route}?{query}", encoded=True)
    headers = {"Authorization": auth} if auth else {}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as response:
        text = await response.text()
        assert response.status in {200, 400, 401, 403}, text
        if response.status == 200 and response.content_type == "application/json":
            assert "rows" in json.loads(text) or route.endswith("openapi.json")
        if response.status == 400:  # the error names a parameter
            error = json.loads(text)["error"]
            assert error["message"].startswith(f"{error['parameter']}: expected"), text
    assert tracebacks(logs.records[seen:]) == []
