"""Helpers for end-to-end tests: metric samples, the ledger through the usage API, the simulator's record."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from extproc.stack import LocalStack
from tests.helpers import KEYS


def sample(stack: LocalStack, name: str, **labels: str) -> float:
    """The sum over workers of one sample (0 when absent)."""
    total = 0.0
    for family in text_string_to_metric_families(stack.metrics_text()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


# Longer than the access log's batch interval (100 ms): a charge still in flight lands within it.
QUIET_S = 0.3


def quiet_sample(stack: LocalStack, name: str, **labels: str) -> float:
    """``sample`` once it has stopped moving: two reads ``QUIET_S`` apart agree. In the layouts
    that charge from the access log, an earlier test's charge may still be on its way."""
    last = sample(stack, name, **labels)
    for _ in range(20):
        time.sleep(QUIET_S)
        now = sample(stack, name, **labels)
        if now == last:
            return now
        last = now
    return last


def sim_records(stack: LocalStack) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = httpx.get(f"{stack.sim_url}/_sim/records").json()
    return records


def ledger_tokens(stack: LocalStack, model: str, kind: str = "total", key: str = "premium") -> int:
    """Tokens charged to ``model`` (exactly as the client named it) in the caller's ledger, read
    through the usage API; metrics label unknown models ``other``, the ledger keeps them."""
    today = dt.datetime.now(tz=dt.UTC).date()
    response = httpx.get(
        f"http://127.0.0.1:{stack.usage_port}/v1/usage",
        params={"group_by": "model", "from": (today - dt.timedelta(days=1)).isoformat()},
        headers={"Authorization": f"Bearer {KEYS[key]}"},
        timeout=10,
    )
    response.raise_for_status()
    rows = {row["model"]: row for row in response.json()["rows"]}
    return int(rows[model][f"{kind}_tokens"]) if model in rows else 0
