"""Helpers for end-to-end tests: metric samples and the simulator's record."""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from extproc.stack import LocalStack


def sample(stack: LocalStack, name: str, **labels: str) -> float:
    """The sum over workers of one sample (0 when absent)."""
    total = 0.0
    for family in text_string_to_metric_families(stack.metrics_text()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def sim_records(stack: LocalStack) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = httpx.get(f"{stack.sim_url}/_sim/records").json()
    return records
