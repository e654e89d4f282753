"""Token counts an upstream reports: a trusted integer, "not reported", or why it is not trusted.

A count is trusted when it is a JSON integer (or an integral float such as ``12.0``) from 0 to
the configured bound (``limits.max_request_tokens``). Anything else (negative, a fraction, a
string, a bool, NaN, infinity, a 400-digit literal) makes the whole usage object untrusted:
``Usage(invalid=<reason>)`` with no numbers, which the session charges as a capped estimate.
Nothing here raises.
"""

from __future__ import annotations

import json
import math
from typing import Any

from extproc.config import DEFAULT_MAX_REQUEST_TOKENS
from extproc.domain import Usage

# Floats are exact integers only up to 2**53; a float count beyond it is not a count we can read.
_MAX_EXACT_FLOAT = float(2**53)
MAX_INT_DIGITS = 19  # every count we accept fits in 19 digits (and in 64 bits)


def int_literal(text: str) -> int | float:
    """``json.loads``' ``parse_int``: an ``int``, or ``±inf`` when longer than ``MAX_INT_DIGITS``.

    A hostile 400-digit literal then costs no big-integer arithmetic (and a 5,000-digit one no
    ``ValueError`` from Python's int/str conversion limit): it simply reads as too large.
    """
    if len(text) <= MAX_INT_DIGITS:
        return int(text)
    return -math.inf if text.startswith("-") else math.inf


def count(value: object) -> tuple[int | None, str]:
    """``(n, "")`` for a trusted count, ``(None, "")`` when not reported, ``(None, reason)`` else."""
    if value is None:
        return None, ""
    if type(value) is int:
        return (value, "") if value >= 0 else (None, "negative")
    if type(value) is float:
        if math.isnan(value):
            return None, "not_finite"
        if value < 0:
            return None, "negative"
        if value > _MAX_EXACT_FLOAT:  # infinity too: 1e400 reads as inf
            return None, "too_large"
        if not value.is_integer():
            return None, "fraction"
        return int(value), ""
    return None, "not_a_number"  # bool, str, list, dict


def usage(
    prompt: object = None,
    completion: object = None,
    total: object = None,
    *,
    cached: object = None,
    cache_creation: object = None,
    reasoning: object = None,
) -> Usage | None:
    """The usage of raw JSON values; ``None`` when nothing is reported.

    A charged part (prompt, completion, total) that cannot be trusted makes the whole usage
    untrusted. The informational parts (cached, cache_creation, reasoning) are only dropped
    ("not reported") when they are bad: the charge does not depend on them.
    """
    charged: list[int | None] = []
    for value in (prompt, completion, total):
        number, problem = count(value)
        if problem:
            return Usage(invalid=problem)
        charged.append(number)
    if charged == [None, None, None]:
        return None
    return Usage(
        prompt_tokens=charged[0],
        completion_tokens=charged[1],
        total_tokens=charged[2],
        cached_tokens=count(cached)[0],
        cache_creation_tokens=count(cache_creation)[0],
        reasoning_tokens=count(reasoning)[0],
    )


def within(found: Usage | None, bound: int = DEFAULT_MAX_REQUEST_TOKENS) -> Usage | None:
    """``found``, or an untrusted usage when one of its counts is above ``bound``."""
    if found is None or found.invalid:
        return found
    for part in (
        found.prompt_tokens,
        found.completion_tokens,
        found.total_tokens,
        found.cached_tokens,
        found.cache_creation_tokens,
        found.reasoning_tokens,
    ):
        if part is not None and part > bound:
            return Usage(invalid="too_large", estimated=found.estimated)
    return found


# Built once: ``json.loads(..., parse_int=...)`` would build a decoder per call (~6 µs).
_DECODER = json.JSONDecoder(parse_int=int_literal)


def loads(text: str | bytes | bytearray) -> Any:
    """``json.loads`` with ``int_literal`` for integers; raises as ``json.loads`` does."""
    if not isinstance(text, str):
        # An object's first byte "{" and a second that is not NUL: no BOM, not UTF-16 or -32, so
        # ``json.detect_encoding`` would say UTF-8 (the usual request, without its ~2 µs).
        utf8 = text[:1] == b"{" and text[1:2] != b"\x00"
        text = bytes(text).decode("utf-8" if utf8 else json.detect_encoding(text), "surrogatepass")
    return _DECODER.decode(text)
