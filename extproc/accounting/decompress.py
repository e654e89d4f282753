"""Incremental gzip / deflate decoding of response bodies, for reading usage only, bounded."""

from __future__ import annotations

import zlib

MAX_OUTPUT_BYTES = 8 << 20  # the default of accounting.max_body_bytes
MAX_RATIO = 100  # accounting.max_decompression_ratio: text and JSON rarely compress past 20x
# Output always allowed whatever the ratio, so a small, very regular body is not taken for a bomb.
RATIO_FLOOR_BYTES = 1 << 20


class Decoder:
    """Feeds compressed chunks, returns plain bytes; never raises, counts what it could not decode.

    Output is capped twice: at ``max_output`` bytes in all, and at ``max_ratio`` times the
    compressed bytes fed so far (never below ``RATIO_FLOOR_BYTES``). A body that would inflate
    past either cap is a decompression bomb: decoding stops there and ``capped`` is set.
    """

    def __init__(
        self, encoding: str, max_output: int = MAX_OUTPUT_BYTES, max_ratio: int = MAX_RATIO
    ) -> None:
        # gzip: header + deflate; "deflate" in HTTP is zlib-wrapped, but raw deflate is common too.
        self._wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
        self._raw_fallback = encoding == "deflate"
        self._decoder = zlib.decompressobj(self._wbits)
        self._max_output = max_output
        self._max_ratio = max_ratio
        self._fed = 0
        self._produced = 0
        self._stopped = False
        self._started = False
        self.capped = False
        self.errors = 0

    def feed(self, chunk: bytes) -> bytes:
        if not chunk or self._stopped:
            return b""
        self._fed += len(chunk)
        allowed = min(self._max_output, max(RATIO_FLOOR_BYTES, self._max_ratio * self._fed))
        room = allowed - self._produced
        if room <= 0:
            return self._cap()
        try:
            out = self._decoder.decompress(chunk, room)
        except zlib.error:
            if self._raw_fallback and not self._started:
                self._raw_fallback = False
                self._decoder = zlib.decompressobj(-zlib.MAX_WBITS)
                self._fed -= len(chunk)
                return self.feed(chunk)
            self.errors += 1
            self._stopped = True
            return b""
        self._started = True
        self._produced += len(out)
        if self._decoder.unconsumed_tail:  # input left over: the output would pass the cap
            self._cap()
        return out

    def _cap(self) -> bytes:
        self.capped = self._stopped = True
        return b""

    def finish(self) -> bytes:
        if self._stopped:
            return b""
        try:
            return self._decoder.flush()
        except zlib.error:
            self.errors += 1
            return b""


def encoding_of(content_encoding: str) -> str | None:
    """The encoding we can read, from a Content-Encoding value; None for identity or unknown."""
    value = content_encoding.strip().lower()
    if value in ("gzip", "x-gzip"):
        return "gzip"
    if value == "deflate":
        return "deflate"
    return None
