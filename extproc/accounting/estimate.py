"""Token estimates for responses without usage: prompt from the request, completion from text seen."""

from __future__ import annotations

import math
from typing import Any

from extproc.domain import Usage

CHARS_PER_TOKEN = 4.0  # the usual rule of thumb for English text with BPE tokenizers


def tokens_from_chars(chars: int, chars_per_token: float = CHARS_PER_TOKEN) -> int:
    return math.ceil(chars / chars_per_token) if chars > 0 else 0


def prompt_chars(body: dict[str, Any]) -> int:
    """Characters of prompt text in an OpenAI / Anthropic / Responses request body."""
    total = 0
    for key in ("messages", "prompt", "input", "system", "instructions"):
        total += _text_chars(body.get(key))
    return total


def _text_chars(value: object) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_chars(item) for item in value)
    if isinstance(value, dict):
        return sum(_text_chars(value.get(key)) for key in ("content", "text", "input"))
    return 0


def completed(
    usage: Usage | None, prompt_estimate: int, content_chars: int, chars_per_token: float
) -> Usage:
    """``usage`` with every missing part estimated; flagged when any part is an estimate.

    Reported fields are never replaced. With nothing reported, the prompt is the request-side
    estimate and the completion is the generated text seen, in tokens.
    """
    usage = usage or Usage()
    if usage.total_tokens is not None:
        return usage
    prompt = usage.prompt_tokens
    completion = usage.completion_tokens
    estimated = False
    if prompt is None:
        prompt, estimated = prompt_estimate, True
    if completion is None:
        completion, estimated = tokens_from_chars(content_chars, chars_per_token), True
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        cached_tokens=usage.cached_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        estimated=usage.estimated or estimated,
    )
