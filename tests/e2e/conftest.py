"""A real Envoy + sidecar + simulator stack for the end-to-end tests, one per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from extproc.stack import LocalStack


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    with LocalStack() as running:
        yield running
