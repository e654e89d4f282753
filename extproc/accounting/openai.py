"""OpenAI chat/completions/embeddings: usage and generated-text size from JSON bodies and SSE."""

from __future__ import annotations

from extproc.accounting import counts
from extproc.accounting.sse import SseEvent, dig, has_object, load_json, string_chars
from extproc.domain import Usage

CHAT_KEYS = (b'"content"',)  # choices[*].delta.content
COMPLETION_KEYS = (b'"text"',)  # choices[*].text


def usage_of(raw: object) -> Usage | None:
    """Map an OpenAI ``usage`` object; ``None`` if it is absent, null or reports nothing.

    ``CompletionUsage`` in openai/openai-openapi ``openapi.yaml`` (f85dbe22): the cached
    (``cached_tokens``) and cache-written (``cache_write_tokens``) prompt tokens, and the
    ``reasoning_tokens`` of the completion, each a part of the prompt or completion count.
    """
    if not isinstance(raw, dict):
        return None
    return counts.usage(
        raw.get("prompt_tokens"),
        raw.get("completion_tokens"),
        raw.get("total_tokens"),
        cached=dig(raw, "prompt_tokens_details", "cached_tokens"),
        cache_creation=dig(raw, "prompt_tokens_details", "cache_write_tokens"),
        reasoning=dig(raw, "completion_tokens_details", "reasoning_tokens"),
    )


def body(obj: object) -> tuple[Usage | None, int]:
    """Usage and generated characters (message content / completion text) of a JSON body."""
    chars = 0
    choices = dig(obj, "choices")
    for choice in choices if isinstance(choices, list) else ():
        chars += text_chars(dig(choice, "message", "content")) + text_chars(dig(choice, "text"))
    return usage_of(dig(obj, "usage")), chars


def text_chars(value: object) -> int:
    """Length of a string, or of the ``text`` of every part in a list of content parts."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(text_chars(dig(part, "text")) for part in value)
    return 0


class Stream:
    """Consumes ``data: <chunk>`` events; usage is the latest non-null ``usage`` seen."""

    def __init__(self, text_keys: tuple[bytes, ...] = CHAT_KEYS) -> None:
        self.text_keys = text_keys
        self.usage: Usage | None = None
        self.chars = 0
        self.errors = 0

    def event(self, ev: SseEvent) -> None:
        data = ev.data  # b"[DONE]" has neither text nor usage, so it needs no test
        for key in self.text_keys:
            self.chars += string_chars(data, key)
        if has_object(data, b'"usage"'):
            obj = load_json(data)
            if not isinstance(obj, dict):
                self.errors += 1
                return
            usage = usage_of(obj.get("usage"))
            if usage is not None:
                self.usage = usage if self.usage is None else self.usage.updated(usage)
