"""Removes the usage-only SSE event we asked for (include_usage injection) from what the client sees."""

from __future__ import annotations

import json

_SEPARATORS = (b"\n\n", b"\r\n\r\n", b"\r\r")


class UsageEventFilter:
    """Passes SSE bytes through whole events at a time, dropping OpenAI's final usage chunk.

    The bytes of an event not yet complete are held back until its end arrives, so a usage
    event split over chunks is still recognised; ``finish`` releases whatever is left.
    """

    def __init__(self, max_held: int = 1 << 20) -> None:
        self._held = bytearray()
        self._max_held = max_held
        self.dropped = 0

    def feed(self, chunk: bytes) -> bytes:
        self._held += chunk
        end = _last_boundary(self._held)
        if end < 0:
            if len(self._held) > self._max_held:  # no event boundary in sight: stop holding
                return self.finish()
            return b""
        complete, self._held = bytes(self._held[:end]), self._held[end:]
        if b'"usage"' not in complete:
            return complete
        return b"".join(e for e in _events(complete) if not self._is_usage_only(e))

    def finish(self) -> bytes:
        rest, self._held = bytes(self._held), bytearray()
        return rest

    def _is_usage_only(self, event: bytes) -> bool:
        if b'"usage"' not in event or b"data:" not in event:
            return False
        data = event.split(b"data:", 1)[1].strip()
        try:
            obj = json.loads(data)
        except ValueError:
            return False
        drop = isinstance(obj, dict) and obj.get("choices") == [] and bool(obj.get("usage"))
        self.dropped += drop
        return drop


def _last_boundary(buf: bytearray) -> int:
    """Index just past the last event separator in ``buf``, or -1."""
    best = -1
    for sep in _SEPARATORS:
        index = buf.rfind(sep)
        if index >= 0:
            best = max(best, index + len(sep))
    return best


def _events(block: bytes) -> list[bytes]:
    """Split complete SSE text into events, each keeping its own separator."""
    events: list[bytes] = []
    start = 0
    while start < len(block):
        ends = [(block.find(sep, start), sep) for sep in _SEPARATORS]
        found = [(i, sep) for i, sep in ends if i >= 0]
        if not found:
            events.append(block[start:])
            break
        index, sep = min(found)
        events.append(block[start : index + len(sep)])
        start = index + len(sep)
    return events
