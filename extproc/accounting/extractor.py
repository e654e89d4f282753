"""The usage-extractor protocol, JSON/SSE extractors over the schemas, and the factory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from extproc.accounting import anthropic, counts, openai, responses
from extproc.accounting.decompress import MAX_RATIO, Decoder
from extproc.accounting.sse import SseEvent, SseSplitter, dig, event_type, load_json
from extproc.config import DEFAULT_MAX_REQUEST_TOKENS
from extproc.domain import Usage

MAX_BODY_BYTES = 8 << 20
TAIL_BYTES = 64 << 10
MAX_EVENT_BYTES = 1 << 20

BodyParser = Callable[[object], tuple[Usage | None, int]]


class UsageExtractor(Protocol):
    def feed(self, chunk: bytes) -> None: ...

    def finish(self) -> Usage | None:
        """The usage seen, ``None`` if none was; safe to call more than once."""
        ...

    @property
    def content_chars(self) -> int:
        """Characters of generated text seen so far (for estimates when usage is missing)."""
        ...

    @property
    def errors(self) -> int:
        """Malformed events or bodies seen; extractors never raise."""
        ...


class EventStream(Protocol):
    """A schema's SSE event consumer (see ``openai.Stream`` and friends)."""

    @property
    def chars(self) -> int: ...

    @property
    def errors(self) -> int: ...

    @property
    def usage(self) -> Usage | None: ...

    def event(self, ev: SseEvent) -> None: ...


class SseExtractor:
    """Splits an event stream and hands each event to a schema's consumer."""

    def __init__(
        self,
        stream: EventStream,
        max_event_bytes: int = MAX_EVENT_BYTES,
        max_count: int = DEFAULT_MAX_REQUEST_TOKENS,
    ) -> None:
        self._splitter = SseSplitter(max_event_bytes)
        self._stream = stream
        self._max_count = max_count
        self._failures = 0

    def feed(self, chunk: bytes) -> None:
        for ev in self._splitter.feed(chunk):
            self._handle(ev)

    def finish(self) -> Usage | None:
        for ev in self._splitter.finish():
            self._handle(ev)
        return counts.within(self._stream.usage, self._max_count)

    @property
    def content_chars(self) -> int:
        return self._stream.chars

    @property
    def errors(self) -> int:
        return self._stream.errors + self._splitter.dropped_events + self._failures

    @property
    def buffered_bytes(self) -> int:
        return self._splitter.buffered

    def _handle(self, ev: SseEvent) -> None:
        try:
            self._stream.event(ev)
        except Exception:  # a schema bug must not break the response stream
            self._failures += 1


class JsonExtractor:
    """Buffers a JSON body up to ``max_body_bytes``; past that keeps only a tail to find usage in.

    ``content_chars`` is known at ``finish()``; for an over-cap body it is the body's byte count,
    a conservative stand-in since the text itself was not kept.
    """

    def __init__(
        self,
        parse: BodyParser,
        max_body_bytes: int = MAX_BODY_BYTES,
        tail_bytes: int = TAIL_BYTES,
        max_count: int = DEFAULT_MAX_REQUEST_TOKENS,
    ) -> None:
        self._parse = parse
        self._max_count = max_count
        self._max = max_body_bytes
        self._tail = tail_bytes
        self._buf = bytearray()
        self._seen = 0
        self._overflow = False
        self._result: tuple[Usage | None, int, int] | None = None

    def feed(self, chunk: bytes) -> None:
        self._seen += len(chunk)
        if not self._overflow:
            if len(self._buf) + len(chunk) <= self._max:
                self._buf += chunk
                return
            self._overflow = True
            self._buf = bytearray(self._buf[-self._tail :]) if self._tail else bytearray()
        if self._tail:
            self._buf += chunk[-self._tail :]
            if len(self._buf) > self._tail:
                del self._buf[: -self._tail]

    def finish(self) -> Usage | None:
        if self._result is None:
            usage, chars, errors = self._evaluate()
            self._result = counts.within(usage, self._max_count), chars, errors
        return self._result[0]

    @property
    def content_chars(self) -> int:
        return self._result[1] if self._result else 0

    @property
    def errors(self) -> int:
        return self._result[2] if self._result else 0

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf)

    def _evaluate(self) -> tuple[Usage | None, int, int]:
        buf, self._buf = self._buf, bytearray()
        if self._overflow:
            raw = tail_usage(buf)
            return (None if raw is None else self._parse({"usage": raw})[0]), self._seen, 0
        if not buf.strip():
            return None, 0, 0
        obj = load_json(buf)
        if not isinstance(obj, dict):
            return None, 0, 1
        try:
            usage, chars = self._parse(obj)
        except Exception:  # a schema bug must not break the response
            return None, 0, 1
        return usage, chars, 0


class DecodingExtractor:
    """Decodes a gzip / deflate body before another extractor reads it; a bomb is not trusted.

    When the body inflates past the decoder's caps, decoding stops and ``finish`` answers an
    untrusted usage (``invalid="decompression_bomb"``), whatever was read before the cap.
    """

    def __init__(self, decoder: Decoder, inner: UsageExtractor) -> None:
        self.decoder = decoder
        self._inner = inner
        self._finished = False

    def feed(self, chunk: bytes) -> None:
        plain = self.decoder.feed(chunk)
        if plain:
            self._inner.feed(plain)

    def finish(self) -> Usage | None:
        if not self._finished:
            self._finished = True
            rest = self.decoder.finish()
            if rest:
                self._inner.feed(rest)
        usage = self._inner.finish()
        return Usage(invalid="decompression_bomb") if self.decoder.capped else usage

    @property
    def content_chars(self) -> int:
        return self._inner.content_chars

    @property
    def errors(self) -> int:
        return self._inner.errors + self.decoder.errors


def tail_usage(tail: bytes | bytearray) -> dict[str, object] | None:
    """The last ``"usage": {...}`` object that is whole in ``tail`` (the end of a huge body)."""
    found = len(tail)
    while (found := tail.rfind(b'"usage"', 0, found)) >= 0:
        at = found + 7
        while at < len(tail) and tail[at] in b" \t\r\n:":
            at += 1
        end = object_end(tail, at)
        if end > 0:
            obj = load_json(tail[at:end])
            if isinstance(obj, dict):
                return obj
    return None


def object_end(buf: bytes | bytearray, start: int) -> int:
    """Index just past the ``}`` matching the ``{`` at ``start`` (strings respected), else -1."""
    if start >= len(buf) or buf[start] != 0x7B:
        return -1
    depth, at, size = 0, start, len(buf)
    while at < size:
        byte = buf[at]
        if byte == 0x22:  # skip a string, honouring escapes
            at += 1
            while at < size and buf[at] != 0x22:
                at += 2 if buf[at] == 0x5C else 1
        elif byte == 0x7B:
            depth += 1
        elif byte == 0x7D:
            depth -= 1
            if depth == 0:
                return at + 1
        at += 1
    return -1


class GenericStream:
    """Routes each event by its type to the OpenAI, Responses or Anthropic consumer."""

    def __init__(self) -> None:
        self._openai = openai.Stream(openai.CHAT_KEYS + openai.COMPLETION_KEYS)
        self._responses = responses.Stream()
        self._anthropic = anthropic.Stream()
        self._all: tuple[EventStream, ...] = (self._openai, self._responses, self._anthropic)

    @property
    def chars(self) -> int:
        return sum(stream.chars for stream in self._all)

    @property
    def errors(self) -> int:
        return sum(stream.errors for stream in self._all)

    @property
    def usage(self) -> Usage | None:
        merged: Usage | None = None
        for stream in self._all:
            usage = stream.usage
            if usage is not None:
                merged = usage if merged is None else merged.updated(usage)
        return merged

    def event(self, ev: SseEvent) -> None:
        kind = ev.event or event_type(ev.data)
        if kind.startswith("response."):
            self._responses.event(ev)
        elif kind.startswith(("message_", "content_block_")):
            self._anthropic.event(ev)
        else:
            self._openai.event(ev)


def generic_body(obj: object) -> tuple[Usage | None, int]:
    """Pick the schema of a JSON body by its usage field names, else by its shape."""
    usage = dig(obj, "usage")
    if isinstance(usage, dict) and ("prompt_tokens" in usage or "completion_tokens" in usage):
        return openai.body(obj)
    if isinstance(usage, dict) and ("input_tokens" in usage or "output_tokens" in usage):
        if "total_tokens" in usage or "input_tokens_details" in usage:
            return responses.body(obj)
        return anthropic.body(obj)
    if dig(obj, "choices") is not None:
        return openai.body(obj)
    if dig(obj, "output") is not None:
        return responses.body(obj)
    return anthropic.body(obj)


_SCHEMAS: tuple[tuple[str, BodyParser, Callable[[], EventStream]], ...] = (
    ("/v1/chat/completions", openai.body, openai.Stream),
    ("/v1/completions", openai.body, lambda: openai.Stream(openai.COMPLETION_KEYS)),
    ("/v1/embeddings", openai.body, lambda: openai.Stream(())),
    ("/v1/responses", responses.body, responses.Stream),
    ("/v1/messages", anthropic.body, anthropic.Stream),
)


def extractor_for(
    content_type: str,
    path: str,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_event_bytes: int = MAX_EVENT_BYTES,
    max_count: int = DEFAULT_MAX_REQUEST_TOKENS,
    encoding: str | None = None,
    max_ratio: int = MAX_RATIO,
) -> UsageExtractor:
    """SSE or JSON by content type; the schema by path suffix (unknown paths: all schemas).

    Usage counts above ``max_count`` are not trusted. With ``encoding`` (``gzip`` or ``deflate``,
    see ``decompress.encoding_of``) the body is decoded first, inflating at most
    ``max_body_bytes`` and ``max_ratio`` times its compressed size.
    """
    if encoding is not None:
        inner = extractor_for(
            content_type,
            path,
            max_body_bytes=max_body_bytes,
            max_event_bytes=max_event_bytes,
            max_count=max_count,
        )
        return DecodingExtractor(Decoder(encoding, max_body_bytes, max_ratio), inner)
    route = path.split("?", 1)[0].rstrip("/")
    parse: BodyParser = generic_body
    stream: Callable[[], EventStream] = GenericStream
    for suffix, schema_parse, schema_stream in _SCHEMAS:
        if route.endswith(suffix):
            parse, stream = schema_parse, schema_stream
            break
    if content_type.split(";", 1)[0].strip().lower() == "text/event-stream":
        return SseExtractor(stream(), max_event_bytes, max_count)
    return JsonExtractor(parse, max_body_bytes, max_count=max_count)
