"""The ledger read back and checked against the simulator's record of what it served: the figures
of a fault run (completed, aborted, lost, double-charged, unsettled, overshoot)."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from extproc.config import Secret, StoreConfig
from extproc.stack import LocalStack
from extproc.store.redis import RedisStore
from tests.e2e.fault_clients import Outcome
from tests.e2e.faults_support import LIMITED, LIMITED_USER, PAYER_USER, TOKEN_LIMIT, Rig

_SETTLE_TIMEOUT_S = 15.0

# -------------------------------------------------------------------------------- the ledger


def sim_by_model(stack: LocalStack) -> dict[str, list[dict[str, Any]]]:
    records: list[dict[str, Any]] = httpx.get(f"{stack.sim_url}/_sim/records", timeout=10).json()
    by_model: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_model.setdefault(str(record["model"]), []).append(record)
    return by_model


def _days() -> list[str]:
    now = dt.datetime.now(tz=dt.UTC)
    return sorted({(now - dt.timedelta(minutes=10)).strftime("%Y%m%d"), now.strftime("%Y%m%d")})


async def _ledger(url: str, user: str) -> dict[str, dict[str, int]]:
    store = RedisStore.from_config(StoreConfig(url=Secret(url)))
    try:
        rows: dict[str, dict[str, int]] = {}
        for row in await store.ledger(user, _days()):
            fields = {k: v for k, v in asdict(row).items() if isinstance(v, int)}
            old = rows.setdefault(row.model, {})
            for name, value in fields.items():
                old[name] = old.get(name, 0) + value
        return rows
    finally:
        await store.close()


def ledger(rig: Rig, user: str) -> dict[str, dict[str, int]]:
    """Model -> its ledger fields summed over the days the run touched (a row per request)."""
    return asyncio.run(_ledger(rig.redis.url, user))


def _accounted(outcome: Outcome, row: dict[str, int] | None) -> bool:
    """A completed response's row is settled; any other served request's row at least holds
    its reservation as unsettled."""
    if row is None:
        return False
    settled = row.get("requests", 0) > 0
    return settled or (not outcome.completed and row.get("unsettled_requests", 0) > 0)


def settled_ledger(rig: Rig, outcomes: Sequence[Outcome]) -> dict[str, dict[str, int]]:
    """Poll (bounded) until every request the simulator saw is accounted and two reads agree."""
    users = {_user(o.plan.key) for o in outcomes}
    deadline = time.monotonic() + _SETTLE_TIMEOUT_S
    previous: dict[str, dict[str, int]] | None = None
    while True:
        served = sim_by_model(rig.stack)
        rows: dict[str, dict[str, int]] = {}
        for user in users:
            rows.update(ledger(rig, user))
        finished = all(r["finished"] for rs in served.values() for r in rs)
        present = all(
            _accounted(o, rows.get(o.plan.model)) for o in outcomes if o.plan.model in served
        )
        if (finished and present and rows == previous) or time.monotonic() > deadline:
            return rows
        previous = rows
        time.sleep(0.25)


def _user(key: str) -> str:
    return LIMITED_USER if key == LIMITED else PAYER_USER


# ------------------------------------------------------------------------------- the figures


@dataclass
class Figures:
    """What a run shows: every completed response must be charged exactly what was served."""

    requests: int = 0
    completed: int = 0
    aborted: int = 0  # reached the model but the client did not get the whole response
    refused: int = 0  # never reached the model (429, 503, a worker gone at admission)
    lost: int = 0  # completed but not charged exactly, or aborted and charged nothing
    double: int = 0  # a row with requests > 1: a response charged twice
    unsettled: int = 0  # admitted, its settle never came (its worker was SIGKILLed)
    charged_tokens: int = 0
    overshoot: float = 0.0  # reservations charged beyond the token limit (overshoot runs)
    restart_s: float = 0.0  # from a worker's signal to its successor listening (worker runs)
    problems: list[str] = field(default_factory=list)

    def problem_lines(self, limit: int = 12) -> list[str]:
        more = len(self.problems) - limit
        tail = [f"  ... and {more} more"] if more > 0 else []
        return [f"  {problem}" for problem in self.problems[:limit]] + tail

    def report(self) -> str:
        counts = {k: v for k, v in asdict(self).items() if k != "problems"}
        return "\n".join([str(counts), *self.problem_lines()])

    def add(self, other: Figures) -> None:
        for name in ("requests", "completed", "aborted", "refused", "lost", "double"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.unsettled += other.unsettled
        self.charged_tokens += other.charged_tokens
        self.overshoot = max(self.overshoot, other.overshoot)
        self.restart_s = max(self.restart_s, other.restart_s)
        self.problems += other.problems


def _exact(row: dict[str, int], record: dict[str, Any]) -> bool:
    return (
        row.get("requests") == 1
        and row.get("total_tokens") == record["total_tokens"]
        and row.get("prompt_tokens") == record["prompt_tokens"]
        and row.get("completion_tokens") == record["completion_tokens"]
        and row.get("estimated_tokens") == 0
        and row.get("unsettled_requests", 0) == 0
    )


def check(
    outcomes: Sequence[Outcome],
    served: dict[str, list[dict[str, Any]]],
    rows: dict[str, dict[str, int]],
    *,
    unsettled_ok: bool = False,
) -> Figures:
    """Each outcome against the simulator's record and its ledger row.

    ``unsettled_ok``: an aborted stream may show as unsettled instead of charged (its worker was
    SIGKILLed, so nobody was left to settle it).
    """
    figures = Figures(requests=len(outcomes))
    for outcome in outcomes:
        model = outcome.plan.model
        row = rows.get(model)
        kind, problem = _verdict(outcome, served.get(model, []), row, unsettled_ok)
        setattr(figures, kind, getattr(figures, kind) + 1)
        figures.charged_tokens += row.get("total_tokens", 0) if row else 0
        figures.unsettled += int(row is not None and row.get("unsettled_requests", 0) > 0)
        if row is not None and row.get("requests", 0) > 1:
            figures.double += 1
            figures.problems.append(f"{model}: charged {row['requests']} times {row}")
        elif problem:
            figures.lost += 1
            figures.problems.append(f"{model}: {problem}")
    return figures


def _verdict(
    outcome: Outcome,
    records: list[dict[str, Any]],
    row: dict[str, int] | None,
    unsettled_ok: bool,
) -> tuple[str, str]:
    """(completed | aborted | refused, what is wrong with its charge or "")."""
    if not records:
        charged = row is not None and row.get("total_tokens", 0) > 0
        return "refused", f"never served but charged {row}" if charged else ""
    if len(records) > 1:
        return "refused", f"served {len(records)} times under one name"
    record = records[0]
    seen = f"served {_served(record)}, row {row}"
    if outcome.completed:
        return "completed", "" if row is not None and _exact(row, record) else f"completed, {seen}"
    if row is not None and record["completed"] and _exact(row, record):
        return "aborted", ""  # the model finished before the hang-up: usage seen, charged exactly
    unsettled = row is not None and row.get("unsettled_requests", 0) > 0
    flagged = (
        row is not None
        and row.get("requests") == 1
        and row.get("estimated_tokens", 0) > 0
        and not unsettled
    )
    if flagged or (unsettled_ok and unsettled):
        return "aborted", ""
    return "aborted", f"aborted ({outcome.error}), {seen}"


def _served(record: dict[str, Any]) -> str:
    done = "completed" if record["completed"] else "cut short"
    return (
        f"{record['prompt_tokens']}+{record['completion_tokens']}={record['total_tokens']} {done}"
    )


def overshoot(
    outcomes: Sequence[Outcome], served: dict[str, list[dict[str, Any]]], charged: int
) -> float:
    """Reservations charged beyond the limit; one reservation is the prompt served plus the
    completion bound, the most a request can use (a larger reservation only loosens this)."""
    reservation = max(
        (
            int(rec["prompt_tokens"]) + o.plan.max_tokens
            for o in outcomes
            for rec in served.get(o.plan.model, [])
        ),
        default=1,
    )
    return max(0, charged - TOKEN_LIMIT) / reservation


def figures_of(rig: Rig, outcomes: Sequence[Outcome], *, unsettled_ok: bool = False) -> Figures:
    rows = settled_ledger(rig, outcomes)
    served = sim_by_model(rig.stack)
    figures = check(outcomes, served, rows, unsettled_ok=unsettled_ok)
    if any(o.plan.key == LIMITED for o in outcomes):
        figures.overshoot = overshoot(outcomes, served, figures.charged_tokens)
    return figures
