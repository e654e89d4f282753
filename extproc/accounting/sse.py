"""Schema-free incremental SSE splitting, plus cheap helpers to peek into JSON event data."""

from __future__ import annotations

from typing import Any, NamedTuple

from extproc.accounting.counts import loads

_LF = 10  # b"\n"
_COLON = 58  # b":"
_QUOTE = 34  # b'"'
_BACKSLASH = 92  # b"\\"
_BRACE = 123  # b"{"
_WHITESPACE = frozenset(b" \t\r\n")
_BOM = b"\xef\xbb\xbf"  # UTF-8 decode strips one at the start of the stream (WHATWG SSE)


class SseEvent(NamedTuple):
    """One dispatched event: its ``event:`` name ("" if none) and its joined ``data:`` lines."""

    event: str
    data: bytes


class SseSplitter:
    """Turns body chunks split anywhere into whole SSE events, with a bounded carry buffer.

    Line ends are normalised to ``\\n`` per chunk (a ``\\r`` ending one chunk swallows a ``\\n``
    starting the next), so an event is simply the bytes before the next ``\\n\\n``. An event
    longer than ``max_event_bytes`` is dropped and counted in ``dropped_events``; the splitter
    then keeps a single byte until the blank line that ends it. A UTF-8 byte order mark at the
    start of the stream is dropped, as the standard's UTF-8 decode does. Checked against a reader
    written from the WHATWG standard (tests/sse_reference.py). Unlike a browser, ``finish``
    flushes a last event that no blank line ended: a cut-off stream's usage still counts.
    """

    def __init__(self, max_event_bytes: int = 1 << 20) -> None:
        self.max_event_bytes = max_event_bytes
        self.dropped_events = 0
        self._buf = bytearray()  # unterminated event, never starting with b"\n"
        self._cr = False  # the last chunk ended in b"\r": a leading b"\n" completes that line end
        self._skipping = False  # inside an oversized event, waiting for its blank line
        self._head: bytes | None = b""  # the stream's first bytes, until a BOM is ruled out

    @property
    def buffered(self) -> int:
        """Bytes held for an unterminated event."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[SseEvent]:
        if self._head is not None:
            chunk = self._head + chunk
            if len(chunk) < len(_BOM) and _BOM.startswith(chunk):
                self._head = chunk  # still maybe a BOM
                return []
            self._head = None
            if chunk.startswith(_BOM):
                chunk = chunk[len(_BOM) :]
        if not chunk:
            return []
        if self._cr and chunk[0] == _LF:
            chunk = chunk[1:]
        self._cr = chunk.endswith(b"\r")
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if chunk and self._skipping:
            chunk = self._skip(chunk)
        if not chunk:
            return []
        events: list[SseEvent] = []
        if self._buf:
            self._buf += chunk
            self._split(self._buf, len(self._buf) - len(chunk) - 1, events)
        else:
            self._split(chunk, 0, events)
        return events

    def finish(self) -> list[SseEvent]:
        """Flush a final event not terminated by a blank line and reset."""
        rest, skipping = bytes(self._buf), self._skipping
        self._buf, self._cr, self._skipping, self._head = bytearray(), False, False, b""
        if skipping or not rest:
            return []
        events: list[SseEvent] = []
        self._dispatch(rest[:-1] if rest[-1] == _LF else rest, events)
        return events

    def _split(self, data: bytes | bytearray, scan: int, events: list[SseEvent]) -> None:
        start, size, limit = 0, len(data), self.max_event_bytes
        while True:
            while start < size and data[start] == _LF:
                start += 1
            end = data.find(b"\n\n", start if start > scan else scan)
            if end < 0:
                break
            if end - start > limit:
                self.dropped_events += 1
            elif data.startswith(b"data:", start) and data.find(b"\n", start, end) < 0:
                start += 6 if data.startswith(b" ", start + 5) else 5  # the common one-line event
                events.append(SseEvent("", bytes(data[start:end])))
            else:
                self._dispatch(bytes(data[start:end]), events)
            start = end + 2
        if size - start > limit + 1:  # whatever ends this event, it is longer than the limit
            self.dropped_events += 1
            self._skipping = True
            self._buf = bytearray(data[-1:])
        elif data is self._buf:
            del self._buf[:start]
        elif start < size:
            self._buf = bytearray(data[start:])

    def _skip(self, chunk: bytes) -> bytes:
        """Drop the oversized event's bytes; return what follows its blank line, if seen."""
        if self._buf == b"\n" and chunk[0] == _LF:
            end = 1
        else:
            found = chunk.find(b"\n\n")
            if found < 0:
                self._buf = bytearray(chunk[-1:])
                return b""
            end = found + 2
        self._buf, self._skipping = bytearray(), False
        return chunk[end:]

    def _dispatch(self, block: bytes, events: list[SseEvent]) -> None:
        if len(block) > self.max_event_bytes:
            self.dropped_events += 1
            return
        name, data = "", []
        for line in block.split(b"\n"):
            if not line or line[0] == _COLON:
                continue
            colon = line.find(b":")
            field, value = (line, b"") if colon < 0 else (line[:colon], line[colon + 1 :])
            if value[:1] == b" ":
                value = value[1:]
            if field == b"data":
                data.append(value)
            elif field == b"event":
                name = value.decode("utf-8", "replace")
        if data:
            events.append(SseEvent(name, data[0] if len(data) == 1 else b"\n".join(data)))


def load_json(data: bytes | bytearray) -> Any:
    """``json.loads`` that never raises: ``None`` for malformed JSON; bad UTF-8 is replaced.

    An integer literal too long to be any count reads as infinity (signed), so a hostile
    400-digit number costs no big-integer arithmetic and reads as "too large" downstream.
    """
    try:
        return loads(data.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return None


def event_type(data: bytes) -> str:
    """The first ``"type"`` string in an event's JSON (the top-level one in the usual layout)."""
    at = _value_at(data, data.find(b'"type"'), 6)
    if at < 0 or at >= len(data) or data[at] != _QUOTE:
        return ""
    end = data.find(b'"', at + 1)
    return data[at + 1 : end].decode("utf-8", "replace") if end > 0 else ""


def string_chars(data: bytes, key: bytes) -> int:
    """Characters in every string value of ``key`` (quoted, e.g. ``b'"content"'``) in JSON data.

    Scans bytes instead of parsing: a key preceded by a backslash lies inside a string and is
    skipped; non-string values (null, arrays) count nothing; escapes are decoded exactly.
    """
    total, step = 0, len(key)
    found = data.find(key)
    while found >= 0:
        after = found + step
        if found and data[found - 1] == _BACKSLASH:
            found = data.find(key, after)
            continue
        at = after + 1 if data.startswith(b':"', after) else _value_at(data, found, step)
        if at < 0 or at >= len(data) or data[at] != _QUOTE:
            found = data.find(key, after)
            continue
        end = data.find(b'"', at + 1)
        if end > 0 and data[end - 1] == _BACKSLASH:
            end = _string_end(data, at + 1)
        if end < 0:
            break
        raw = data[at + 1 : end]
        if raw.isascii() and b"\\" not in raw:
            total += len(raw)
        else:
            total += _literal_chars(data, at, end)
        found = data.find(key, end + 1)
    return total


def has_object(data: bytes, key: bytes) -> bool:
    """Whether ``key`` (quoted) has an object value somewhere, so ``"usage":null`` costs no parse."""
    found = data.find(key)
    while found >= 0:
        at = _value_at(data, found, len(key))
        if 0 <= at < len(data) and data[at] == _BRACE:
            return True
        found = data.find(key, found + len(key))
    return False


def _value_at(data: bytes, found: int, step: int) -> int:
    """Index of the value after a key found at ``found`` (``step`` long), -1 if not a key."""
    if found < 0:
        return -1
    at, size = found + step, len(data)
    if data.startswith(b':"', at):
        return at + 1
    while at < size and data[at] in _WHITESPACE:
        at += 1
    if at >= size or data[at] != _COLON:
        return -1
    at += 1
    while at < size and data[at] in _WHITESPACE:
        at += 1
    return at


def _string_end(data: bytes, start: int) -> int:
    """Index of the quote closing a JSON string whose body starts at ``start``, -1 if none."""
    end = data.find(b'"', start)
    while end >= 0:
        back = end - 1
        while back >= start and data[back] == _BACKSLASH:
            back -= 1
        if (end - 1 - back) % 2 == 0:
            return end
        end = data.find(b'"', end + 1)
    return -1


def _literal_chars(data: bytes, opening: int, closing: int) -> int:
    """Characters of the JSON string literal ``data[opening:closing + 1]`` (escapes decoded)."""
    raw = data[opening + 1 : closing]
    if b"\\" in raw:
        text = load_json(data[opening : closing + 1])
        if isinstance(text, str):
            return len(text)
    return len(raw.decode("utf-8", "replace"))


def dig(obj: object, *keys: str) -> object:
    """``obj[k1][k2]...``, or ``None`` as soon as a level is not an object or lacks the key."""
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj
