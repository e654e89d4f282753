"""Token estimates for responses without usage: prompt from the request, completion from text seen."""

from __future__ import annotations

import logging
import math
from typing import Any

from extproc.domain import Usage

log = logging.getLogger("extproc.session")  # the logger the untrusted-usage line always used

CHARS_PER_TOKEN = 4.0  # the usual rule of thumb for English text with BPE tokenizers


def tokens_from_chars(chars: int, chars_per_token: float = CHARS_PER_TOKEN) -> int:
    return math.ceil(chars / chars_per_token) if chars > 0 else 0


def prompt_chars(body: dict[str, Any]) -> int:
    """Characters of prompt text in an OpenAI / Anthropic / Responses request body.

    Walked with an explicit stack, not recursion: a body nested as deep as the JSON parser
    allows must not overflow the interpreter's stack here.
    """
    total = 0
    get = body.get
    pending: list[object] = [
        get("messages"),
        get("prompt"),
        get("input"),
        get("system"),
        get("instructions"),
    ]
    while pending:
        value = pending.pop()
        if value is None:  # most parts are absent: skip them before the type tests
            continue
        if isinstance(value, str):
            total += len(value)
        elif isinstance(value, list):
            pending += value
        elif isinstance(value, dict):
            pending += (value.get("content"), value.get("text"), value.get("input"))
    return total


def completed(
    usage: Usage | None,
    prompt_estimate: int,
    content_chars: int,
    chars_per_token: float,
    cap: int | None = None,
) -> Usage:
    """``usage`` with every missing part estimated; flagged when any part is an estimate.

    Reported fields are never replaced. With nothing reported, the prompt is the request-side
    estimate and the completion is the generated text seen, in tokens. With ``cap`` (the
    request's own bound: its reservation), the estimated parts are cut so that the total never
    passes it; reported parts are kept even when they alone pass it.
    """
    usage = usage or Usage()
    if usage.total_tokens is not None:
        return usage
    prompt = usage.prompt_tokens
    completion = usage.completion_tokens
    estimated = False
    if prompt is None:
        prompt, estimated = prompt_estimate, True
        if cap is not None:
            prompt = min(prompt, max(0, cap - (completion or 0)))
    if completion is None:
        completion, estimated = tokens_from_chars(content_chars, chars_per_token), True
        if cap is not None:
            completion = min(completion, max(0, cap - prompt))
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        cached_tokens=usage.cached_tokens,
        cache_creation_tokens=usage.cache_creation_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        estimated=usage.estimated or estimated,
        invalid=usage.invalid,
    )


def untrusted(
    usage: Usage,
    prompt_estimate: int,
    content_chars: int,
    chars_per_token: float,
    cap: int | None,
) -> Usage:
    """The charge for usage the upstream reported but we cannot trust (``usage.invalid``).

    None of its numbers are used: the prompt estimate plus the generated text seen, cut to
    ``cap`` (the request's reservation: prompt estimate plus completion bound), never more;
    flagged as an estimate and keeping the reason. ``None``: no reservation was taken.
    """
    return completed(
        Usage(invalid=usage.invalid), prompt_estimate, content_chars, chars_per_token, cap
    )


def charged(
    usage: Usage | None,
    *,
    failed: bool,
    prompt_estimate: int,
    content_chars: int,
    chars_per_token: float,
    cap: int | None,
    who: tuple[str, str] = ("", ""),
) -> Usage:
    """What one response is charged, from the usage read (None: none was found).

    Untrusted usage: the capped estimate, with one log line naming ``who`` (user, model). A
    reported total: as reported. An upstream error that reported nothing: nothing. Anything else:
    the missing parts estimated (``completed``), cut to ``cap`` (the request's reservation; None:
    no reservation was taken, so no cap).
    """
    if usage is not None and usage.invalid:
        log.warning(
            "upstream usage not trusted: reason=%s user=%s model=%s: charged a capped estimate",
            usage.invalid,
            *who,
        )
        return untrusted(usage, prompt_estimate, content_chars, chars_per_token, cap)
    if usage is not None and usage.total_tokens is not None:
        return usage
    if failed and (usage is None or not usage.reported):
        return Usage()
    return completed(usage, prompt_estimate, content_chars, chars_per_token, cap)
