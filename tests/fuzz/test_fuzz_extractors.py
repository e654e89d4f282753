"""Fuzzing the usage extractors with hostile usage payloads, split anywhere, compressed or not."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from extproc.accounting.extractor import extractor_for
from extproc.config import DEFAULT_MAX_REQUEST_TOKENS
from extproc.domain import UNTRUSTED_REASONS
from tests.fuzz import strategies as hs
from tests.fuzz.profile import FUZZ

PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages", "/other")


@FUZZ
@given(
    answer=hs.response_bodies(),
    path=st.sampled_from(PATHS),
    encoding=st.sampled_from(("", "gzip")),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
)
def test_usage_is_absent_trusted_and_bounded_or_untrusted_without_numbers(
    answer: tuple[str, bytes], path: str, encoding: str, cuts: list[int]
) -> None:
    content_type, body = answer
    extractor = extractor_for(content_type, path, encoding=encoding or None)
    for chunk in hs.split(hs.encode(body, encoding), cuts):
        extractor.feed(chunk)
    usage = extractor.finish()
    assert extractor.content_chars >= 0
    if usage is None:
        return
    parts = (
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
        usage.cached_tokens,
        usage.reasoning_tokens,
    )
    if usage.invalid:
        assert usage.invalid in UNTRUSTED_REASONS
        assert parts == (None,) * 5
    else:
        for part in parts:
            assert part is None or (type(part) is int and 0 <= part <= DEFAULT_MAX_REQUEST_TOKENS)
