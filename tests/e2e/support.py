"""Helpers for end-to-end tests: metric samples, the ledger through the usage API, the simulator's record."""

from __future__ import annotations

import datetime as dt
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
