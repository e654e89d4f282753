"""The default's hostile numbers against the STREAMED layout (`full`), the fallback: a module of
its own, because they use the free tier's window, which test_streamed_layout's gateway cases fill."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from extproc.stack import LocalStack
from tests.e2e.test_hostile_numbers import (
    test_a_98_kb_gzip_bomb_is_charged_at_most_the_reservation,
    test_json_nested_20000_levels_is_a_400,
    test_max_tokens_10_30_is_refused_and_cannot_reset_the_free_window,
    test_max_tokens_10_400_is_a_400_and_no_lock_out,
    test_untrusted_upstream_usage_is_charged_a_capped_estimate_and_no_lock_out,
)

__all__ = [
    "test_a_98_kb_gzip_bomb_is_charged_at_most_the_reservation",
    "test_json_nested_20000_levels_is_a_400",
    "test_max_tokens_10_30_is_refused_and_cannot_reset_the_free_window",
    "test_max_tokens_10_400_is_a_400_and_no_lock_out",
    "test_untrusted_upstream_usage_is_charged_a_capped_estimate_and_no_lock_out",
]


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    """Overrides the conftest stack: the STREAMED layout."""
    with LocalStack(topology="full") as running:
        yield running
