"""Session charging rules (case -> what is charged), request rewrite, compression, usage hiding."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest
from google.protobuf import struct_pb2

from extproc.accounting.decompress import Decoder, encoding_of
from extproc.accounting.estimate import completed, prompt_chars, tokens_from_chars
from extproc.accounting.usage_filter import UsageEventFilter
from extproc.config import AccountingConfig
from extproc.domain import Usage
from extproc.envoy import handover
from extproc.envoy.handover import METADATA_NAMESPACE, Billing
from extproc.envoy.session import Session, with_include_usage

CHAT = "/ns/m/v1/chat/completions"
SSE_WITH_USAGE = (
    b'data: {"choices":[{"index":0,"delta":{"content":"hello world"}}],"usage":null}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
    b"data: [DONE]\n\n"
)
SSE_NO_USAGE = (
    b'data: {"choices":[{"index":0,"delta":{"content":"hello world!"}}]}\n\n'  # 12 characters
    b"data: [DONE]\n\n"
)


def metadata(inject: bool = False, prompt_est: int = 10) -> dict[str, struct_pb2.Struct]:
    billing = Billing(
        request_id="r1",
        userid="alice",
        tier="free",
        model="m",
        path=CHAT,
        reserved=64,
        windows=(1000,),
        inject=inject,
        prompt_estimate=prompt_est,
    )
    return {METADATA_NAMESPACE: handover.to_struct(billing)}


def session(config: AccountingConfig | None = None, **meta: object) -> Session:
    s = Session(config or AccountingConfig())
    s.bind(metadata(**meta))  # type: ignore[arg-type]
    return s


def run(s: Session, status: int, body: bytes, content_type: str = "text/event-stream") -> Usage:
    assert s.on_response_headers(status, content_type, "")
    s.on_body(body, True)
    charge = s.finish()
    assert charge is not None
    return charge.usage


def test_reported_usage_is_charged_as_reported() -> None:
    usage = run(session(), 200, SSE_WITH_USAGE)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (3, 2, 5)
    assert not usage.estimated


def test_success_without_usage_is_an_estimate() -> None:
    usage = run(session(prompt_est=10), 200, SSE_NO_USAGE)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (10, 3, 13)
    assert usage.estimated


def test_upstream_error_without_usage_costs_nothing() -> None:
    usage = run(session(), 500, b'{"error": {"message": "boom"}}', "application/json")
    assert usage.total() == 0
    assert not usage.estimated


def test_upstream_error_with_usage_is_charged() -> None:
    body = b'{"error": "x", "usage": {"prompt_tokens": 4, "total_tokens": 4}}'
    assert run(session(), 400, body, "application/json").total() == 4


def test_disconnect_charges_what_was_delivered() -> None:
    s = session(prompt_est=7)
    s.on_response_headers(200, "text/event-stream", "")
    s.on_body(SSE_NO_USAGE[:60], False)  # cut inside the first event's content
    charge = s.finish(disconnected=True)
    assert charge is not None
    assert charge.disconnected
    assert charge.usage.estimated
    assert charge.usage.prompt_tokens == 7
    assert s.finish() is None  # charged once


def test_unbilled_requests_have_no_charge() -> None:
    s = Session(AccountingConfig())
    s.bind({})
    assert not s.on_response_headers(200, "application/json", "")
    assert s.finish() is None


def test_partial_usage_keeps_reported_parts() -> None:
    usage = completed(Usage(prompt_tokens=9), 100, 8, 4.0)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (9, 2, 11)
    assert usage.estimated


@pytest.mark.parametrize(
    ("body", "chars"),
    [
        ({"messages": [{"role": "user", "content": "abcd"}]}, 4),
        ({"messages": [{"content": [{"type": "text", "text": "ab"}, {"type": "image"}]}]}, 2),
        ({"prompt": ["ab", "cd"]}, 4),
        ({"input": "abc", "instructions": "de"}, 5),
        ({"system": "abc", "messages": []}, 3),
    ],
)
def test_prompt_chars(body: dict[str, object], chars: int) -> None:
    assert prompt_chars(body) == chars


def test_tokens_from_chars_rounds_up() -> None:
    assert [tokens_from_chars(n) for n in (0, 1, 4, 5)] == [0, 1, 1, 2]


def test_request_rewrite_asks_for_usage_and_keeps_other_options() -> None:
    body = json.dumps({"stream": True, "stream_options": {"x": 1}, "text": "é"}).encode()
    rewritten = with_include_usage(body)
    assert rewritten is not None
    assert json.loads(rewritten)["stream_options"] == {"x": 1, "include_usage": True}
    assert json.loads(rewritten)["text"] == "é"
    assert with_include_usage(b"not json") is None
    assert with_include_usage(b"[1]") is None


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw-deflate"])
def test_compressed_bodies_are_read(encoding: str) -> None:
    if encoding == "gzip":
        packed = gzip.compress(SSE_WITH_USAGE)
    elif encoding == "deflate":
        packed = zlib.compress(SSE_WITH_USAGE)
    else:
        squeezer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        packed = squeezer.compress(SSE_WITH_USAGE) + squeezer.flush()
    s = session()
    header = "gzip" if encoding == "gzip" else "deflate"
    assert s.on_response_headers(200, "text/event-stream", header)
    for i in range(0, len(packed), 5):
        assert s.on_body(packed[i : i + 5], False) is None  # read only: never rewritten
    s.on_body(b"", True)
    charge = s.finish()
    assert charge is not None
    assert charge.usage.total_tokens == 5


def test_corrupt_compressed_body_never_raises() -> None:
    decoder = Decoder("gzip")
    assert decoder.feed(b"definitely not gzip") == b""
    assert decoder.errors == 1
    assert decoder.feed(b"more") == b""


def test_decompression_output_is_bounded() -> None:
    bomb = gzip.compress(b"\0" * (10 << 20))
    decoder = Decoder("gzip", max_output=1 << 20)
    out = b"".join(decoder.feed(bomb[i : i + 4096]) for i in range(0, len(bomb), 4096))
    assert len(out) == 1 << 20


def test_encoding_names() -> None:
    assert encoding_of("GZIP") == "gzip"
    assert encoding_of("deflate") == "deflate"
    assert encoding_of("br") is None
    assert encoding_of("identity") is None


def test_usage_filter_drops_only_the_usage_chunk_at_any_split() -> None:
    expected = SSE_WITH_USAGE.replace(
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n',
        b"",
    )
    for cut in range(len(SSE_WITH_USAGE) + 1):
        f = UsageEventFilter()
        out = f.feed(SSE_WITH_USAGE[:cut]) + f.feed(SSE_WITH_USAGE[cut:]) + f.finish()
        assert out == expected, cut
        assert f.dropped == 1


def test_hidden_usage_is_still_charged() -> None:
    config = AccountingConfig(hide_injected_usage=True)
    s = session(config, inject=True)
    assert s.wants_request_body
    assert s.rewrite_request(b'{"stream": true}') is not None
    s.on_response_headers(200, "text/event-stream", "")
    out = s.on_body(SSE_WITH_USAGE, True)
    assert out is not None
    assert b'"usage":{' not in out
    charge = s.finish()
    assert charge is not None
    assert charge.usage.total_tokens == 5


@pytest.mark.parametrize("cached", [False, True])
def test_the_route_admission_counted_in_reaches_the_charge(cached: bool) -> None:
    from extproc.domain import Decision, Identity, Outcome, Tier
    from extproc.envoy.replies import CheckReplies, check_response

    route = "llm/facebook-opt-125m-simulated-kserve-route"
    decision = Decision(
        Outcome.ALLOW,
        identity=Identity("alice", "alice"),
        tier=Tier("free", 0, frozenset()),
        model="m",
        route=route,
        charged=True,
    )
    replies = CheckReplies()
    if cached:
        replies.reply(decision, CHAT)  # the second reply of a user comes from the cache
    reply = replies.reply(decision, CHAT) if cached else check_response(decision, CHAT)
    s = Session(AccountingConfig())
    s.bind({METADATA_NAMESPACE: reply.dynamic_metadata})
    assert s.on_response_headers(200, "application/json", "")
    s.on_body(b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}', True)
    charge = s.finish()
    assert charge is not None
    assert charge.route == route


@pytest.mark.parametrize(
    ("total", "reason"), [("1e308", "too_large"), ("9" * 400, "too_large"), ("-1", "negative")]
)
@pytest.mark.parametrize("status", [200, 400])
def test_untrusted_usage_is_charged_the_estimate_capped_at_the_reservation(
    total: str, reason: str, status: int
) -> None:
    text = "word " * 1000  # 5,000 characters: an estimate of 1,250 completion tokens
    body = json.dumps({"choices": [{"message": {"content": text}}]})[:-1]
    body += ',"usage":{"prompt_tokens":3,"total_tokens":' + total + "}}"
    usage = run(session(prompt_est=10), status, body.encode(), "application/json")
    assert usage.invalid == reason
    assert usage.estimated
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (10, 54, 64)


def test_any_estimate_is_capped_at_the_reservation() -> None:
    long_text = b'data: {"choices":[{"delta":{"content":"' + b"x" * 4000 + b'"}}]}\n\n'
    usage = run(session(prompt_est=10), 200, long_text)
    assert usage.estimated
    assert usage.total_tokens == 64  # the reservation, not 10 + 1,000


def test_a_gzip_bomb_is_untrusted_and_charged_at_most_the_reservation() -> None:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = packer.compress(b'{"usage":{"total_tokens":5}}') + b"".join(
        packer.compress(b" " * (1 << 20)) for _ in range(64)
    )
    bomb += packer.flush()
    s = session(AccountingConfig(max_body_bytes=1 << 20))
    assert s.on_response_headers(200, "application/json", "gzip")
    for at in range(0, len(bomb), 8192):
        s.on_body(bomb[at : at + 8192], False)
    s.on_body(b"", True)
    charge = s.finish()
    assert charge is not None
    assert charge.usage.invalid == "decompression_bomb"
    assert charge.usage.total() <= 64
