"""One reading of a request path for routing, model access and the Kuadrant domain, or none at all.

Upstreams read paths leniently (aiohttp and most ASGI servers percent-decode, servlet containers
drop ``;params``, many merge slashes or ignore a trailing one), so the sidecar must classify the
path as the most lenient of them would read it: whatever an upstream can serve is then seen as
what it is. ``normalize`` percent-decodes every segment, drops ``;params`` per segment (RFC 3986
§3.3), removes dot segments (RFC 3986 §5.2.4), merges slashes and drops a trailing slash.

Paths that have no single reading get ``None`` instead of a guess: an encoded slash or backslash
(``%2F``, ``%5C``: one server splits there, the next does not), a raw backslash, a malformed
escape, control characters, bytes that are not UTF-8, and ``..;x``-style segments (dot segments
to one server, names to Envoy's router: the classic way to check access on one route and be
routed to another).
"""

from __future__ import annotations

import re

_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")  # a % not followed by two hex digits
_FORBIDDEN_RAW = re.compile(r"[\x00-\x20\x7f\\]")
_SEPARATORS = frozenset("/\\")
MODEL_PREFIX = "v1"  # the API prefix of body-model routes: /v1/...


def normalize(raw: str) -> str | None:
    """The path without query string, read as a lenient upstream would; None if ambiguous."""
    path = raw.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/") or _FORBIDDEN_RAW.search(path) or _ESCAPE.search(path):
        return None
    segments: list[str] = []
    for raw_segment in path.split("/"):
        base, params, _ = raw_segment.partition(";")
        segment = _decode(base)
        if segment is None:
            return None
        if segment in (".", ".."):
            if params:
                return None  # `..;x`: a dot segment to us, a name to the router
            if segment == ".." and segments:
                segments.pop()
        elif segment:
            segments.append(segment)
    return "/" + "/".join(segments)


def _decode(segment: str) -> str | None:
    if "%" not in segment:
        return segment
    try:
        text = _unquote(segment)
    except UnicodeDecodeError:
        return None
    if any(c in _SEPARATORS or ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        return None
    return text


def _unquote(segment: str) -> str:
    """Percent-decoding (escapes already checked to be two hex digits); the result must be UTF-8."""
    out = bytearray()
    pieces = segment.split("%")
    out += pieces[0].encode()
    for piece in pieces[1:]:
        out.append(int(piece[:2], 16))
        out += piece[2:].encode()
    return out.decode("utf-8")


def model_route(path: str) -> tuple[str, str]:
    """``(namespace, name)`` of a normalized ``/<namespace>/<name>/v1/...`` path, else ``("", "")``."""
    index = path.find("/" + MODEL_PREFIX + "/")
    if index > 0:
        segments = path[1:index].split("/")
        if len(segments) == 2 and all(segments):
            return segments[0], segments[1]
    return "", ""


def under_model_prefix(path: str) -> bool:
    """Whether a normalized path can reach a model: ``/v1...`` or ``/<namespace>/<name>/<more>``."""
    segments = path[1:].split("/")
    return segments[0] == MODEL_PREFIX or len(segments) >= 3
