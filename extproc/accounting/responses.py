"""OpenAI Responses API: usage and generated-text size from JSON bodies and SSE."""

from __future__ import annotations

from extproc.accounting import counts
from extproc.accounting.sse import SseEvent, dig, event_type, has_object, load_json, string_chars
from extproc.domain import Usage

FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
TEXT_DELTA = "response.output_text.delta"


def usage_of(raw: object) -> Usage | None:
    """Map a Responses ``usage`` object (input/output naming) to prompt/completion.

    ``ResponseUsage`` in openai/openai-openapi ``openapi.yaml`` (f85dbe22):
    ``input_tokens_details.{cached_tokens,cache_write_tokens}`` and
    ``output_tokens_details.reasoning_tokens``, parts of the input and output counts.
    """
    if not isinstance(raw, dict):
        return None
    return counts.usage(
        raw.get("input_tokens"),
        raw.get("output_tokens"),
        raw.get("total_tokens"),
        cached=dig(raw, "input_tokens_details", "cached_tokens"),
        cache_creation=dig(raw, "input_tokens_details", "cache_write_tokens"),
        reasoning=dig(raw, "output_tokens_details", "reasoning_tokens"),
    )


def body(obj: object) -> tuple[Usage | None, int]:
    """Usage and ``output_text`` characters of a JSON response object."""
    chars = 0
    output = dig(obj, "output")
    for item in output if isinstance(output, list) else ():
        content = dig(item, "content")
        if dig(item, "type") != "message" or not isinstance(content, list):
            continue
        for part in content:
            text = dig(part, "text")
            if dig(part, "type") == "output_text" and isinstance(text, str):
                chars += len(text)
    return usage_of(dig(obj, "usage")), chars


class Stream:
    """Counts ``output_text`` deltas; usage comes from the final ``response.*`` event."""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.chars = 0
        self.errors = 0

    def event(self, ev: SseEvent) -> None:
        kind = ev.event or event_type(ev.data)
        if kind == TEXT_DELTA:
            self.chars += string_chars(ev.data, b'"delta"')
        elif kind in FINAL_EVENTS and has_object(ev.data, b'"usage"'):
            obj = load_json(ev.data)
            if not isinstance(obj, dict):
                self.errors += 1
                return
            usage = usage_of(dig(obj, "response", "usage"))
            if usage is not None:
                self.usage = usage if self.usage is None else self.usage.updated(usage)
