"""Hypothesis strategies for hostile input: Check requests, usage payloads, ext_proc message streams.

Bodies are built as JSON *text*, so number literals that no JSON encoder writes (``1e400``,
400-digit integers, ``NaN``) and nesting deeper than any parser allows reach the sidecar as a
client or an upstream would send them.
"""

from __future__ import annotations

import gzip
import itertools
import json

from hypothesis import strategies as st

from tests.helpers import CHAT, KEYS

# Numbers as a client or an upstream may write them; most are not counts we accept.
HOSTILE_NUMBERS = (
    "-1",
    "0",
    "1",
    "1.5",
    "12.0",
    '"10"',
    "true",
    "null",
    "[]",
    "{}",
    "1e30",
    "1e308",
    "1e400",
    "-1e400",
    "NaN",
    "Infinity",
    "-Infinity",
    "999999",
    "1000000",
    "1000001",
    str(2**53 + 1),
    str(2**63),
    str(10**30),
    str(10**400),
    "9" * 5000,
)

number_literals = st.one_of(
    st.sampled_from(HOSTILE_NUMBERS),
    st.integers(-(10**25), 10**25).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(json.dumps),
)
_words = st.text(st.characters(codec="utf-8"), max_size=40)


def nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


_nesting = st.one_of(st.integers(0, 50), st.integers(900, 1100), st.just(20_000)).map(nested)
json_values = st.one_of(
    number_literals,
    _words.map(json.dumps),
    _nesting,
    st.lists(_words, max_size=3).map(lambda items: json.dumps([{"content": w} for w in items])),
)
_REQUEST_KEYS = (
    "model",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "stream",
    "stream_options",
    "messages",
    "prompt",
    "input",
)


def json_object(pairs: dict[str, str]) -> str:
    return "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in pairs.items()) + "}"


request_bodies = st.one_of(
    st.dictionaries(st.sampled_from(_REQUEST_KEYS), json_values, max_size=6).map(json_object),
    st.dictionaries(st.sampled_from(_REQUEST_KEYS[1:4]), number_literals, min_size=1).map(
        lambda pairs: json_object({"model": '"m"', **pairs})
    ),
    _nesting,
    st.text(max_size=80),
).map(str.encode) | st.binary(max_size=80)

AUTHORIZATIONS = (
    *(f"Bearer {key}" for key in KEYS.values()),
    "Bearer demo-admin-key",
    "Bearer nope",
    "bearer demo-premium-key",
    "Basic abc",
    "Bearer",
    "",
)
_header_names = st.one_of(
    st.sampled_from(
        (
            "x-maas-username",
            "x-maas-tier",
            "x-maas-inject",
            "x-maas-anything",
            "content-type",
            "access-control-request-method",
            "x_maas_username",
        )
    ),
    st.from_regex(r"[a-z][a-z0-9_-]{0,12}", fullmatch=True),
)
check_headers = st.builds(
    lambda auth, extra: {**extra, **({"authorization": auth} if auth is not None else {})},
    st.sampled_from(AUTHORIZATIONS[1:3]) | st.none() | st.sampled_from(AUTHORIZATIONS),
    st.dictionaries(_header_names, st.text(max_size=30), max_size=5),
)
methods = st.just("POST") | st.sampled_from(("GET", "OPTIONS", "PUT", "post", "", "DELETE"))
_PREFIX = CHAT.removesuffix("/v1/chat/completions")
paths = st.one_of(
    st.just(CHAT),
    st.sampled_from(
        (
            CHAT,
            f"{_PREFIX}/v1/completions",
            f"{_PREFIX}/v1/embeddings",
            f"{_PREFIX}/v1/models",
            "/v1/messages",
            "/v1/responses",
            "/v1/chat/completions",
        )
    ),
    st.builds(lambda base, tail: base + tail, st.just(CHAT), st.text(max_size=12)),
    st.text(max_size=40),
)

# --- upstream answers ------------------------------------------------------------------------


@st.composite
def usage_objects(draw: st.DrawFn) -> str:
    """An OpenAI-, Responses- or Anthropic-named usage object with any numbers at all."""
    names = draw(
        st.sampled_from(
            (
                ("prompt_tokens", "completion_tokens", "total_tokens"),
                ("input_tokens", "output_tokens", "total_tokens"),
                ("input_tokens", "output_tokens", "cache_read_input_tokens"),
            )
        )
    )
    chosen = draw(st.lists(st.sampled_from(names), unique=True))
    return json_object({name: draw(number_literals) for name in chosen})


@st.composite
def response_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    """(content type, body): JSON or SSE with hostile usage, sometimes garbage."""
    usage = draw(usage_objects())
    text = draw(_words)
    kind = draw(st.sampled_from(("json", "sse", "anthropic-sse", "garbage")))
    if kind == "json":
        body = json_object(
            {"choices": json.dumps([{"message": {"content": text}}]), "usage": usage}
        )
        return "application/json", body.encode()
    if kind == "sse":
        chunk = json.dumps({"choices": [{"delta": {"content": text}}], "usage": None})
        final = json_object({"choices": "[]", "usage": usage})
        sep = draw(st.sampled_from(("data: ", "data:")))
        end = draw(st.sampled_from(("\n\n", "\r\n\r\n", "\r\r")))
        events = [f"{sep}{chunk}{end}", f"{sep}{final}{end}", f"data: [DONE]{end}"]
        return "text/event-stream", "".join(events).encode()
    if kind == "anthropic-sse":
        delta = json_object({"type": '"message_delta"', "usage": usage})
        return "text/event-stream", f"event: message_delta\ndata: {delta}\n\n".encode()
    return draw(st.sampled_from(("application/json", "text/event-stream", "x/y"))), draw(
        st.binary(max_size=200)
    )


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    """``body`` cut at the given offsets (taken modulo its length)."""
    points = sorted({c % (len(body) + 1) for c in cuts} | {0, len(body)})
    return [body[a:b] for a, b in itertools.pairwise(points)]


def encode(body: bytes, encoding: str) -> bytes:
    return gzip.compress(body) if encoding == "gzip" else body
