"""The SSE splitter against a reader written from the WHATWG standard, at every byte split."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.accounting.sse import SseSplitter
from tests.sse_reference import MessageEvent, interpret

Events = list[tuple[str, str]]


def reference(body: bytes) -> Events:
    return [(event.type, event.data) for event in interpret(body).dispatched]


def split(chunks: list[bytes]) -> tuple[Events, Events]:
    """What the splitter dispatched while fed ``chunks``, and what ``finish`` flushed after."""
    splitter = SseSplitter()
    fed = [event for chunk in chunks for event in splitter.feed(chunk)]
    flushed = splitter.finish()
    as_text = [(e.event, e.data.decode("utf-8", "replace")) for e in fed]
    return as_text, [(e.event, e.data.decode("utf-8", "replace")) for e in flushed]


def test_the_reference_reads_the_standards_own_examples() -> None:
    assert interpret(b"data: YHOO\ndata: +2\ndata: 10\n\n").dispatched == [
        MessageEvent("", "YHOO\n+2\n10", "")
    ]
    stream = interpret(
        b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\n"
        b"data:  third event\n"
    )
    assert stream.dispatched == [
        MessageEvent("", "first event", "1"),
        MessageEvent("", "second event", ""),
    ]  # the third is not followed by a blank line
    assert reference(b"data\n\ndata\ndata\n\ndata:") == [("", ""), ("", "\n")]
    assert reference(b"data:test\n\ndata: test\n\n") == [("", "test"), ("", "test")]


def test_no_space_after_the_colon_is_the_same_event() -> None:
    for body in (b'data:{"usage":1}\n\n', b'data: {"usage":1}\n\n', b'data:{"usage":1}\r\n\r\n'):
        assert split([body])[0] == reference(body) == [("", '{"usage":1}')]


def test_a_byte_order_mark_starts_the_stream_not_the_first_field() -> None:
    body = b'\xef\xbb\xbfdata:{"usage":1}\n\n'
    for at in range(len(body) + 1):
        assert split([body[:at], body[at:]])[0] == reference(body) == [("", '{"usage":1}')]


# Lines as an upstream (or an attacker) may write them: every field the standard names, unknown
# and case-changed ones, no space or two after the colon, a colon-less field, comments, blanks.
NAMES = st.sampled_from(["data", "data", "event", "id", "retry", "Data", "dat", "datas", "x", ""])
SEPARATORS = st.sampled_from([":", ": ", ":  ", ":", "::"])
VALUES = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]), max_size=12
) | st.sampled_from(['{"usage":{"total_tokens":7}}', "[DONE]", "1500", " ", ":"])
FIELD = st.builds(lambda n, s, v: n + s + v, NAMES, SEPARATORS, VALUES)
BARE = NAMES  # a line without a colon: the whole line is the field name
COMMENT = VALUES.map(lambda v: ":" + v)
LINE = st.one_of(FIELD, FIELD, BARE, COMMENT, st.just(""))
END = st.sampled_from(["\n", "\r\n", "\r"])
START = st.sampled_from(["", "", "\ufeff", "\ufeff\ufeff"])  # UTF-8 decode strips one BOM
BODIES = st.builds(
    lambda start, pairs: (start + "".join(line + end for line, end in pairs)).encode(),
    START,
    st.lists(st.tuples(LINE, END), max_size=14),
)


@settings(max_examples=300, deadline=None)
@given(BODIES)
def test_every_single_split_dispatches_what_the_standard_dispatches(body: bytes) -> None:
    expected = reference(body)
    for at in range(len(body) + 1):
        fed, _ = split([body[:at], body[at:]])
        assert fed == expected, (body, at)


@settings(max_examples=300, deadline=None)
@given(BODIES, st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_any_chunking_dispatches_what_the_standard_dispatches(body: bytes, cuts: list[int]) -> None:
    points = sorted({min(c, len(body)) for c in cuts})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    fed, flushed = split(chunks)
    assert fed == reference(body)
    # A stream cut short: `finish` flushes the event a final blank line would have dispatched.
    assert fed + flushed == reference(body + b"\n\n")


@settings(max_examples=200, deadline=None)
@given(BODIES)
def test_byte_by_byte(body: bytes) -> None:
    assert split([body[i : i + 1] for i in range(len(body))])[0] == reference(body)
