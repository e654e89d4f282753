"""Usage extraction: recorded corpus, chunk-split independence, hostile and huge bodies."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.accounting.extractor import (
    GenericStream,
    JsonExtractor,
    SseExtractor,
    UsageExtractor,
    extractor_for,
    generic_body,
)
from extproc.accounting.sse import SseEvent, SseSplitter, string_chars
from extproc.domain import Usage

CORPUS = Path(__file__).resolve().parent.parent / "corpus"
EXPECTED: dict[str, dict[str, Any]] = json.loads((CORPUS / "expected.json").read_text())
NAMES = sorted(EXPECTED)
SSE = "text/event-stream"


def body_of(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


def make(name: str, generic: bool = False) -> UsageExtractor:
    spec = EXPECTED[name]
    return extractor_for(spec["content_type"], "/unknown" if generic else spec["path"])


def run(extractor: UsageExtractor, chunks: list[bytes]) -> tuple[dict[str, Any] | None, int]:
    for chunk in chunks:
        extractor.feed(chunk)
    extractor.feed(b"")  # end of stream may arrive as its own empty chunk
    usage = extractor.finish()
    return (None if usage is None else fields(usage)), extractor.content_chars


def fields(usage: Usage) -> dict[str, Any]:
    out = asdict(usage)
    assert out.pop("estimated") is False
    assert out.pop("invalid") == ""
    return out


def expected(name: str) -> tuple[dict[str, Any] | None, int]:
    return EXPECTED[name]["usage"], EXPECTED[name]["content_chars"]


def test_corpus_is_complete() -> None:
    on_disk = {p.name for p in CORPUS.iterdir()} - {"expected.json"}
    assert on_disk == set(NAMES)


@pytest.mark.parametrize("generic", [False, True], ids=["schema", "generic"])
@pytest.mark.parametrize("name", NAMES)
def test_corpus_whole(name: str, generic: bool) -> None:
    extractor = make(name, generic)
    assert run(extractor, [body_of(name)]) == expected(name)
    assert extractor.errors == 0
    assert extractor.finish() == extractor.finish()  # idempotent


@pytest.mark.parametrize("name", NAMES)
def test_corpus_split_at_every_byte(name: str) -> None:
    body, want = body_of(name), expected(name)
    for cut in range(len(body) + 1):
        assert run(make(name), [body[:cut], body[cut:]]) == want, cut


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_corpus_random_chunks(name: str, data: st.DataObject) -> None:
    body = body_of(name)
    sizes = data.draw(st.lists(st.integers(0, 97), max_size=len(body)))
    chunks, at = [], 0
    for size in sizes:
        chunks.append(body[at : at + size])
        at += size
    chunks.append(body[at:])
    generic = data.draw(st.booleans())
    assert run(make(name, generic), chunks) == expected(name)


# --- SSE splitter --------------------------------------------------------------------------


def split_all(stream: bytes, chunks: list[int] | None = None, limit: int = 1 << 20) -> list[Any]:
    splitter, events, at = SseSplitter(limit), [], 0
    for size in chunks or []:
        events += splitter.feed(stream[at : at + size])
        at += size
    events += splitter.feed(stream[at:])
    events += splitter.finish()
    return [(e.event, e.data) for e in events] + [("dropped", splitter.dropped_events)]


def test_splitter_fields() -> None:
    stream = (
        b": comment\n"
        b"event: greet\ndata:  two spaces\ndata:x\ndata\nid: 7\nretry: 10\n\n"
        b"\n\n\n"
        b"event: only-name\n\n"
        b"data: last, unterminated"
    )
    assert split_all(stream) == [
        ("greet", b" two spaces\nx\n"),
        ("", b"last, unterminated"),
        ("dropped", 0),
    ]


def test_splitter_line_ends_are_equivalent() -> None:
    lf = b"event: a\ndata: 1\n\ndata: 2\ndata: 3\n\n\ndata: 4\n"
    want = split_all(lf)
    for variant in (lf.replace(b"\n", b"\r\n"), lf.replace(b"\n", b"\r")):
        assert split_all(variant) == want
        for cut in range(len(variant) + 1):
            assert split_all(variant, [cut]) == want


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(st.sampled_from([b"data: x\xc3\xa9", b"event: e", b"", b": c", b"data:"])),
    ends=st.lists(st.sampled_from([b"\n", b"\r\n", b"\r"]), min_size=1),
    sizes=st.lists(st.integers(0, 9)),
    limit=st.sampled_from([5, 12, 1 << 20]),
)
def test_splitter_split_independent(
    lines: list[bytes], ends: list[bytes], sizes: list[int], limit: int
) -> None:
    stream = b"".join(line + ends[i % len(ends)] for i, line in enumerate(lines))
    assert split_all(stream, sizes, limit) == split_all(stream, None, limit)


def test_splitter_drops_oversized_event_and_resyncs() -> None:
    big = b"data: " + b"x" * 5000 + b"\n\n"
    stream = b"data: a\n\n" + big + b"data: b\n\n" + big[:-2]
    want = [("", b"a"), ("", b"b"), ("dropped", 2)]
    assert split_all(stream, None, 1000) == want
    assert split_all(stream, [7] * 2000, 1000) == want
    splitter = SseSplitter(1000)
    for at in range(0, len(stream), 100):
        splitter.feed(stream[at : at + 100])
        assert splitter.buffered <= 1001 + 100


# --- cheap string measuring --------------------------------------------------------------


json_text = st.text(st.characters(codec="utf-8"), max_size=20)


@settings(max_examples=200, deadline=None)
@given(
    texts=st.lists(json_text, max_size=3),
    other=json_text,
    ascii_only=st.booleans(),
    spaced=st.booleans(),
)
def test_string_chars_matches_json(
    texts: list[str], other: str, ascii_only: bool, spaced: bool
) -> None:
    obj = {
        "choices": [{"delta": {"content": t}, "x": {"content": [other]}} for t in texts],
        "args": json.dumps({"content": other}),
        "content_x": other,
        "content": None,
    }
    data = json.dumps(
        obj, ensure_ascii=ascii_only, separators=(", ", ": ") if spaced else (",", ":")
    )
    assert string_chars(data.encode(), b'"content"') == sum(len(t) for t in texts)


# --- semantics -----------------------------------------------------------------------------


def sse(*payloads: object) -> bytes:
    return b"".join(b"data: " + json.dumps(p).encode() + b"\n\n" for p in payloads)


def test_usage_null_chunks_ignored_and_later_usage_wins() -> None:
    chunk = {"choices": [{"delta": {"content": "ab"}}], "usage": None}
    first = {
        "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
    later = {"choices": [], "usage": {"completion_tokens": 2, "total_tokens": 5}}
    extractor = extractor_for(SSE, "/v1/chat/completions")
    extractor.feed(sse(chunk, first, chunk, later, chunk) + b"data: [DONE]\n\n")
    assert extractor.finish() == Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    assert extractor.content_chars == 6
    assert extractor.errors == 0


def test_missing_usage_is_none_and_unreported_fields_stay_none() -> None:
    extractor = extractor_for("application/json", "/v1/chat/completions")
    extractor.feed(b'{"choices":[{"message":{"content":"hey"}}]}')
    assert extractor.finish() is None
    assert extractor.content_chars == 3
    extractor = extractor_for("application/json", "/v1/chat/completions")
    extractor.feed(b'{"usage":{"prompt_tokens":5,"completion_tokens":null}}')
    assert extractor.finish() == Usage(prompt_tokens=5)
    extractor = extractor_for(SSE, "/v1/messages")
    extractor.feed(
        b"event: message_delta\ndata: " + json.dumps({"usage": {"output_tokens": 9}}).encode()
    )
    usage = extractor.finish()
    assert usage == Usage(completion_tokens=9)  # no input reported: no prompt, no total
    assert usage is not None
    assert usage.total() == 9


def test_generic_body_picks_schema() -> None:
    anthropic_like = {
        "usage": {"input_tokens": 1, "output_tokens": 2, "cache_read_input_tokens": 3}
    }
    assert generic_body(anthropic_like)[0] == Usage(4, 2, 6, 3)
    responses_like = {"usage": {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}}
    assert generic_body(responses_like)[0] == Usage(1, 2, 3)
    assert generic_body([1, 2]) == (None, 0)


def test_factory_routes() -> None:
    assert isinstance(
        extractor_for("Text/Event-Stream; charset=utf-8", "/x/v1/messages?a=b"), SseExtractor
    )
    assert isinstance(extractor_for("application/json", "/v1/responses/"), JsonExtractor)
    generic = extractor_for(SSE, "/openai/deployments/x/chat")
    assert isinstance(generic, SseExtractor)
    assert isinstance(generic._stream, GenericStream)


# --- hostile and huge bodies ----------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=300), sizes=st.lists(st.integers(0, 50)), sse_ct=st.booleans())
def test_garbage_never_raises(body: bytes, sizes: list[int], sse_ct: bool) -> None:
    for path in ("/v1/chat/completions", "/v1/responses", "/v1/messages", "/other"):
        extractor = extractor_for(SSE if sse_ct else "application/json", path)
        at = 0
        for size in sizes:
            extractor.feed(body[at : at + size])
            at += size
        extractor.feed(body[at:])
        extractor.finish()
        assert extractor.content_chars >= 0
        assert extractor.errors >= 0


@pytest.mark.parametrize("name", NAMES)
def test_truncated_and_corrupted_corpus_never_raises(name: str) -> None:
    body = body_of(name)
    for cut in range(0, len(body), 7):
        for generic in (False, True):
            run(make(name, generic), [body[:cut]])
            run(make(name, generic), [body[:cut] + b"\xff\xfe\xc3" + body[cut:]])
    if name.endswith(".json"):
        extractor = make(name)
        assert run(extractor, [body[: len(body) // 2]])[0] is None
        assert extractor.errors == 1


def test_malformed_usage_event_counted() -> None:
    extractor = extractor_for(SSE, "/v1/chat/completions")
    extractor.feed(b'data: {"usage": {"prompt_tokens": 1\n\n')
    extractor.feed(b"event: message_start\ndata: [[[[\n\n")
    assert extractor.finish() is None
    assert extractor.errors == 1


def test_deep_nesting_and_bad_utf8_json() -> None:
    extractor = extractor_for("application/json", "/v1/chat/completions")
    extractor.feed(b"[" * 100_000)
    assert extractor.finish() is None
    assert extractor.errors == 1
    extractor = extractor_for("application/json", "/v1/chat/completions")
    extractor.feed(
        b'{"choices":[{"text":"a\xff\xfeb"}],"usage":{"prompt_tokens":2,"total_tokens":2}}'
    )
    assert extractor.finish() == Usage(prompt_tokens=2, total_tokens=2)


@pytest.mark.parametrize("chunk_size", [64 << 10, 30 << 20])
def test_huge_json_usage_at_end(chunk_size: int) -> None:
    head = b'{"object":"list","data":[{"object":"embedding","index":0,"embedding":['
    floats = b"0.0123456789," * (20 * (1 << 20) // 13)
    tail = (
        b'0.5]}],"note":"a } { \\" \\"usage\\": {","usage":{"prompt_tokens":7,"total_tokens":7,'
        b'"x":"} \\"}"},"model":"m"}'
    )
    body = head + floats + tail
    extractor = extractor_for("application/json", "/v1/embeddings")
    assert isinstance(extractor, JsonExtractor)
    peak = 0
    for at in range(0, len(body), chunk_size):
        extractor.feed(body[at : at + chunk_size])
        peak = max(peak, extractor.buffered_bytes)
    assert peak <= 8 << 20
    assert extractor.finish() == Usage(prompt_tokens=7, total_tokens=7)
    assert extractor.content_chars == len(body)  # conservative stand-in once over the cap
    assert extractor.errors == 0


def test_huge_json_without_usage() -> None:
    extractor = JsonExtractor(generic_body, max_body_bytes=1000, tail_bytes=100)
    extractor.feed(b'{"usage": {"prompt_tokens": 1}, "x": "' + b"y" * 5000 + b'"}')
    assert extractor.finish() is None
    assert extractor.buffered_bytes == 0


@pytest.mark.parametrize("chunk_size", [16 << 10, 8 << 20])
def test_huge_sse_event_dropped(chunk_size: int) -> None:
    usage = {
        "choices": [],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }
    huge = b'data: {"choices":[{"delta":{"content":"' + b"z" * (5 << 20) + b'"}}]}\n\n'
    body = (
        sse({"choices": [{"delta": {"content": "hi"}}]}) + huge + sse(usage) + b"data: [DONE]\n\n"
    )
    extractor = extractor_for(SSE, "/v1/chat/completions")
    assert isinstance(extractor, SseExtractor)
    for at in range(0, len(body), chunk_size):
        extractor.feed(body[at : at + chunk_size])
        assert extractor.buffered_bytes <= (1 << 20) + 1
    assert extractor.finish() == Usage(1, 2, 3)
    assert extractor.content_chars == 2
    assert extractor.errors == 1  # the dropped event


def test_schema_bug_is_contained() -> None:
    class Broken:
        chars = errors = 0
        usage = None

        def event(self, ev: SseEvent) -> None:
            raise RuntimeError(ev.data)

    extractor = SseExtractor(Broken())
    extractor.feed(b"data: x\n\n")
    assert extractor.finish() is None
    assert extractor.errors == 1
