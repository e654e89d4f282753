"""Incremental gzip / deflate decoding of response bodies, for reading usage only, bounded."""

from __future__ import annotations

import zlib

MAX_OUTPUT_BYTES = 64 << 20  # a decompression bomb stops here; the extractor caps what it keeps


class Decoder:
    """Feeds compressed chunks, returns plain bytes; never raises, counts what it could not decode."""

    def __init__(self, encoding: str, max_output: int = MAX_OUTPUT_BYTES) -> None:
        # gzip: header + deflate; "deflate" in HTTP is zlib-wrapped, but raw deflate is common too.
        self._wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
        self._raw_fallback = encoding == "deflate"
        self._decoder = zlib.decompressobj(self._wbits)
        self._left = max_output
        self._started = False
        self.errors = 0

    def feed(self, chunk: bytes) -> bytes:
        if not chunk or self._left <= 0:
            return b""
        try:
            out = self._decoder.decompress(chunk, self._left)
        except zlib.error:
            if self._raw_fallback and not self._started:
                self._raw_fallback = False
                self._decoder = zlib.decompressobj(-zlib.MAX_WBITS)
                return self.feed(chunk)
            self.errors += 1
            self._left = 0
            return b""
        self._started = True
        self._left -= len(out)
        return out

    def finish(self) -> bytes:
        if self._left <= 0:
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
