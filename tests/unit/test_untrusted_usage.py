"""Usage an upstream reports but we cannot trust: hostile numbers, bounds, decompression bombs."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest

from extproc.accounting import counts, estimate
from extproc.accounting.decompress import Decoder
from extproc.accounting.extractor import extractor_for
from extproc.domain import Usage

SSE = "text/event-stream"
JSON = "application/json"

# (JSON literal, reason): each one in place of a charged count makes the usage untrusted.
HOSTILE = [
    ("-1", "negative"),
    ("1.5", "fraction"),
    ('"10"', "not_a_number"),
    ("true", "not_a_number"),
    ("[7]", "not_a_number"),
    ("{}", "not_a_number"),
    ("NaN", "not_finite"),
    ("Infinity", "too_large"),
    ("-Infinity", "negative"),
    ("1e308", "too_large"),
    ("1e400", "too_large"),  # json reads it as inf
    (str(10**400), "too_large"),  # int(...) of it would cost big-integer work; read as inf
    ("9" * 5000, "too_large"),  # past Python's int/str digit limit: json.loads would raise
    ("1000001", "too_large"),  # above the default limits.max_request_tokens
]


def openai_json(total: str) -> bytes:
    return (
        b'{"choices":[{"message":{"content":"hello"}}],'
        b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":' + total.encode() + b"}}"
    )


def openai_sse(total: str) -> bytes:
    return (
        b'data: {"choices":[{"delta":{"content":"hello"}}],"usage":null}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,'
        b'"total_tokens":' + total.encode() + b"}}\n\ndata: [DONE]\n\n"
    )


def responses_json(total: str) -> bytes:
    return b'{"output":[],"usage":{"input_tokens":3,"output_tokens":' + total.encode() + b"}}"


def responses_sse(total: str) -> bytes:
    return (
        b"event: response.completed\n"
        b'data: {"type":"response.completed","response":{"usage":'
        b'{"input_tokens":3,"output_tokens":2,"total_tokens":' + total.encode() + b"}}}\n\n"
    )


def anthropic_json(output: str) -> bytes:
    return b'{"content":[],"usage":{"input_tokens":3,"output_tokens":' + output.encode() + b"}}"


def anthropic_sse(cache_read: str) -> bytes:
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 3}}}
    return (
        b"event: message_start\ndata: " + json.dumps(start).encode() + b"\n\n"
        b"event: message_delta\ndata: "
        b'{"type":"message_delta","usage":{"output_tokens":2,"cache_read_input_tokens":'
        + cache_read.encode()
        + b"}}\n\n"
    )


BODIES = [
    (JSON, "/v1/chat/completions", openai_json),
    (SSE, "/v1/chat/completions", openai_sse),
    (JSON, "/v1/responses", responses_json),
    (SSE, "/v1/responses", responses_sse),
    (JSON, "/v1/messages", anthropic_json),
    (SSE, "/v1/messages", anthropic_sse),
    (JSON, "/other", openai_json),  # the generic extractor
    (SSE, "/other", openai_sse),
]


@pytest.mark.parametrize(("content_type", "path", "make"), BODIES)
@pytest.mark.parametrize(("literal", "reason"), HOSTILE)
def test_hostile_counts_are_untrusted_never_raised_never_charged(
    content_type: str, path: str, make: object, literal: str, reason: str
) -> None:
    assert callable(make)
    body: bytes = make(literal)
    for cut in (len(body), 7, len(body) // 2):  # whole, and split into chunks
        extractor = extractor_for(content_type, path)
        for at in range(0, len(body), cut):
            extractor.feed(body[at : at + cut])
        usage = extractor.finish()
        assert usage == Usage(invalid=reason), (literal, usage)
        assert usage.total() == 0  # none of its numbers is charged as such


@pytest.mark.parametrize(("content_type", "path", "make"), BODIES)
def test_the_same_bodies_with_a_sane_count_are_trusted(
    content_type: str, path: str, make: object
) -> None:
    assert callable(make)
    extractor = extractor_for(content_type, path)
    extractor.feed(make("5"))
    usage = extractor.finish()
    assert usage is not None
    assert usage.invalid == ""
    assert usage.total() >= 5


def test_the_bound_is_configurable() -> None:
    for bound, expected in ((4, "too_large"), (5, "")):
        extractor = extractor_for(JSON, "/v1/chat/completions", max_count=bound)
        extractor.feed(openai_json("5"))
        usage = extractor.finish()
        assert usage is not None
        assert usage.invalid == expected


def test_informational_counts_are_dropped_not_distrusted() -> None:
    raw = {"prompt_tokens": 3, "total_tokens": 5, "prompt_tokens_details": {"cached_tokens": "x"}}
    extractor = extractor_for(JSON, "/v1/chat/completions")
    extractor.feed(json.dumps({"usage": raw}).encode())
    assert extractor.finish() == Usage(prompt_tokens=3, total_tokens=5)


@pytest.mark.parametrize(
    ("path", "usage"),
    [
        ("/v1/chat/completions", {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
         "prompt_tokens_details": {"cached_tokens": -1, "cache_write_tokens": 1.5},
         "completion_tokens_details": {"reasoning_tokens": "2"}}),
        ("/v1/responses", {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5,
         "input_tokens_details": {"cached_tokens": True, "cache_write_tokens": [1]},
         "output_tokens_details": {"reasoning_tokens": float("nan")}}),
        ("/v1/messages", {"input_tokens": 3, "output_tokens": 2,
         "output_tokens_details": {"thinking_tokens": -4}}),
    ],
)  # fmt: skip
def test_bad_kind_counts_read_as_not_reported_in_every_schema(
    path: str, usage: dict[str, object]
) -> None:
    """A kind is informational (a part of prompt or completion): a bad one is dropped to "not
    reported" (null in the usage API), the charge stands on the trusted counts."""
    extractor = extractor_for(JSON, path)
    extractor.feed(json.dumps({"usage": usage}).encode())
    assert extractor.finish() == Usage(3, 2, 5)


def test_a_kind_above_the_bound_distrusts_the_usage() -> None:
    """As a charged count: a number no single request can have is not believed at all."""
    raw = {"input_tokens": 3, "output_tokens": 2, "output_tokens_details": {"thinking_tokens": 9}}
    extractor = extractor_for(JSON, "/v1/messages", max_count=8)
    extractor.feed(json.dumps({"usage": raw}).encode())
    usage = extractor.finish()
    assert usage is not None
    assert usage.invalid == "too_large"


def test_an_integral_float_is_a_count() -> None:
    assert counts.count(12.0) == (12, "")
    assert counts.count(2.0**53 + 2) == (None, "too_large")
    assert counts.count(None) == (None, "")


def test_later_trusted_usage_does_not_clear_an_untrusted_event() -> None:
    body = openai_sse("-1") + (
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,'
        b'"total_tokens":5}}\n\n'
    )
    extractor = extractor_for(SSE, "/v1/chat/completions")
    extractor.feed(body)
    usage = extractor.finish()
    assert usage is not None
    assert usage.invalid == "negative"


# --- estimates: never above the request's own bound ---------------------------------------


def test_untrusted_usage_is_charged_the_estimate_capped_at_the_reservation() -> None:
    charged = estimate.untrusted(
        Usage(invalid="too_large"),
        prompt_estimate=30,
        content_chars=4_000_000,
        chars_per_token=4,
        cap=100,
    )
    assert charged == Usage(30, 70, 100, estimated=True, invalid="too_large")
    small = estimate.untrusted(Usage(invalid="negative"), 3, 8, 4, cap=100)
    assert small == Usage(3, 2, 5, estimated=True, invalid="negative")
    tiny_cap = estimate.untrusted(Usage(invalid="negative"), 300, 8, 4, cap=100)
    assert tiny_cap.total() == 100


def test_completed_estimates_are_capped_but_reported_parts_are_kept() -> None:
    assert estimate.completed(None, 10, 4000, 4, cap=50).total() == 50
    assert estimate.completed(None, 10, 4000, 4).total() == 1010  # no cap: as before
    kept = estimate.completed(Usage(prompt_tokens=80), 10, 4000, 4, cap=50)
    assert kept == Usage(80, 0, 80, estimated=True)


# --- decompression bombs ------------------------------------------------------------------


def bomb(padding: int, head: bytes = b'{"choices":[],"usage":{"total_tokens":5}}') -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [packer.compress(head)]
    spaces = b" " * (1 << 20)
    parts += [packer.compress(spaces) for _ in range(padding >> 20)]
    return b"".join([*parts, packer.flush()])


def test_a_98_kb_gzip_bomb_is_capped_and_not_trusted() -> None:
    packed = bomb(100 << 20)
    assert len(packed) < 110_000  # about 98 KB on the wire, 100 MiB inflated
    extractor = extractor_for(JSON, "/v1/chat/completions", encoding="gzip")
    for at in range(0, len(packed), 16 << 10):
        extractor.feed(packed[at : at + (16 << 10)])
    assert extractor.finish() == Usage(invalid="decompression_bomb")
    decoder = extractor.decoder  # type: ignore[attr-defined]
    assert decoder.capped


def test_the_ratio_cap_stops_a_bomb_below_the_size_cap() -> None:
    packed = bomb(20 << 20)  # 20 MiB from ~20 KB: about 1000x
    decoder = Decoder("gzip", max_output=64 << 20, max_ratio=100)
    out = sum(len(decoder.feed(packed[at : at + 4096])) for at in range(0, len(packed), 4096))
    assert decoder.capped
    assert out <= max(100 * len(packed), 1 << 20)


def test_ordinary_compressed_bodies_are_not_bombs() -> None:
    body = openai_json("5") * 1 + b" " * 1000
    extractor = extractor_for(JSON, "/v1/chat/completions", encoding="gzip")
    extractor.feed(gzip.compress(body))
    usage = extractor.finish()
    assert usage is not None
    assert usage.total_tokens == 5
    sse = b"".join(
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"delta":'
        b'{"content":"tok%d "}}],"usage":null}\n\n' % i
        for i in range(20_000)
    ) + openai_sse("5")
    packed = gzip.compress(sse)
    extractor = extractor_for(SSE, "/v1/chat/completions", encoding="gzip")
    for at in range(0, len(packed), 1000):
        extractor.feed(packed[at : at + 1000])
    usage = extractor.finish()
    assert usage is not None
    assert usage.total_tokens == 5
