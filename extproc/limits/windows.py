"""Window arithmetic shared by the stores: fixed windows from the first hit, and sliding windows."""

from __future__ import annotations

import math


def fixed_expired(window_start_ms: int, window_ms: int, now_ms: int) -> bool:
    return now_ms >= window_start_ms + window_ms


def bucket_of(now_ms: int, window_ms: int) -> int:
    """The aligned sub-window a sliding counter writes into at ``now_ms``."""
    return now_ms // window_ms


def sliding_value(current: int, previous: int, now_ms: int, window_ms: int) -> int:
    """Hits in the last ``window_ms``: the current bucket plus the unexpired share of the previous."""
    elapsed = now_ms - bucket_of(now_ms, window_ms) * window_ms
    weight = (window_ms - elapsed) / window_ms
    return current + math.floor(previous * weight)


def sliding_reset_ms(now_ms: int, window_ms: int) -> int:
    """Milliseconds until the current bucket ends, when the oldest hits start to leave the view."""
    return (bucket_of(now_ms, window_ms) + 1) * window_ms - now_ms


def retry_after_s(reset_ms: int) -> int:
    """Whole seconds for ``Retry-After``; never 0, so a client always backs off."""
    return max(1, math.ceil(reset_ms / 1000))
