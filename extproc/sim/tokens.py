"""Deterministic token counting and token text generation for the model simulator."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

Api = Literal["chat", "completions", "embeddings", "models", "messages", "responses"]

DEFAULT_COMPLETION_TOKENS = 16
_LIMIT_KEYS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_PIECES = tuple(f"tok{i} " for i in range(4096))


def count_words(value: object) -> int:
    """Whitespace-separated words in a string, a list, or a message/content-part dict."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(count_words(v) for v in value)
    if isinstance(value, dict):
        text = value.get("text")
        if isinstance(text, str):
            return len(text.split())
        return count_words(value.get("content"))
    if isinstance(value, int) and not isinstance(value, bool):
        return 1  # a pre-tokenised input (embeddings accept lists of token ids)
    return 0


def prompt_tokens(api: Api, body: Mapping[str, Any]) -> int:
    """Prompt tokens for a request body of the given API: its word count, at least 1."""
    if api == "chat":
        n = count_words(body.get("messages"))
    elif api == "completions":
        n = count_words(body.get("prompt"))
    elif api == "messages":
        n = count_words(body.get("system")) + count_words(body.get("messages"))
    elif api in ("embeddings", "responses"):
        n = count_words(body.get("input"))
    else:
        return 0
    return max(1, n)


def token_limit(body: Mapping[str, Any]) -> int | None:
    """The request's output-token cap (max_completion_tokens / max_tokens / max_output_tokens)."""
    for key in _LIMIT_KEYS:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def completion_tokens(
    body: Mapping[str, Any], override: int | None = None, default: int = DEFAULT_COMPLETION_TOKENS
) -> tuple[int, bool]:
    """(tokens to generate, whether the cap was hit): override or default, capped by the body."""
    limit = token_limit(body)
    wanted = max(0, override) if override is not None else default if limit is None else limit
    if limit is not None and wanted >= limit:
        return limit, True
    return wanted, False


def piece(i: int) -> str:
    """The text of the i-th completion token: one word followed by a space."""
    return _PIECES[i] if i < len(_PIECES) else f"tok{i} "


def completion_text(n: int) -> str:
    """The full text of an n-token completion."""
    return "".join(piece(i) for i in range(n))
