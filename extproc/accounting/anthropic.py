"""Anthropic Messages API: usage and generated-text size from JSON bodies and SSE.

The ``usage`` object (``Usage`` and ``MessageDeltaUsage`` of anthropics/anthropic-sdk-python,
generated from Anthropic's OpenAPI spec; ``src/anthropic/types/usage.py`` at 0c20cf40,
``message_delta_usage.py`` at 385c568d): ``input_tokens`` (not read from or written to a cache),
``cache_read_input_tokens``, ``cache_creation_input_tokens``, ``output_tokens``, and
``output_tokens_details.thinking_tokens`` ("always <= output_tokens": our reasoning tokens).
``message_delta`` counts are cumulative, so the latest value of each field wins.
"""

from __future__ import annotations

from extproc.accounting import counts
from extproc.accounting.sse import SseEvent, dig, event_type, load_json, string_chars
from extproc.domain import Usage

# Charged: every one is part of the prompt or the completion.
FIELDS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
THINKING = "output_tokens_details.thinking_tokens"  # informational: a part of output_tokens
USAGE_EVENTS = frozenset({"message_start", "message_delta"})
TEXT_DELTA = "content_block_delta"


def usage_of(raw: object) -> Usage | None:
    """Map an Anthropic ``usage`` object: the prompt includes cache reads and cache writes."""
    if not isinstance(raw, dict):
        return None
    checked = [counts.count(raw.get(name)) for name in FIELDS]
    for _, problem in checked:
        if problem:  # every field is charged (cache reads and writes are part of the prompt)
            return Usage(invalid=problem)
    fresh, output, read, written = (number for number, _ in checked)
    prompt = None if fresh is None else fresh + (read or 0) + (written or 0)
    if prompt is None and output is None and read is None:
        return None
    total = None if prompt is None or output is None else prompt + output
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=output,
        total_tokens=total,
        cached_tokens=read,
        cache_creation_tokens=written,
        reasoning_tokens=counts.count(dig(raw, *THINKING.split(".")))[0],
    )


def body(obj: object) -> tuple[Usage | None, int]:
    """Usage and ``text`` block characters of a JSON message."""
    chars = 0
    content = dig(obj, "content")
    for block in content if isinstance(content, list) else ():
        text = dig(block, "text")
        if dig(block, "type") == "text" and isinstance(text, str):
            chars += len(text)
    return usage_of(dig(obj, "usage")), chars


class Stream:
    """Counts text deltas; usage from ``message_start``, then ``message_delta`` (latest wins)."""

    def __init__(self) -> None:
        # The latest raw value of each field, as a usage object (checked in usage_of).
        self.fields: dict[str, object] = {}
        self.chars = 0
        self.errors = 0

    @property
    def usage(self) -> Usage | None:
        return usage_of(self.fields)

    def event(self, ev: SseEvent) -> None:
        kind = ev.event or event_type(ev.data)
        if kind == TEXT_DELTA:
            self.chars += string_chars(ev.data, b'"text"')
        elif kind in USAGE_EVENTS:
            obj = load_json(ev.data)
            if not isinstance(obj, dict):
                self.errors += 1
                return
            raw = dig(obj, "message", "usage") if kind == "message_start" else obj.get("usage")
            for name in FIELDS:
                value = dig(raw, name)
                if value is not None:
                    self.fields[name] = value
            thinking = dig(raw, *THINKING.split("."))
            if thinking is not None:
                self.fields["output_tokens_details"] = {"thinking_tokens": thinking}
