"""The fault rig: Redis with AOF behind a two-worker stack, the faults, and the ledger checked
against the simulator's record of what it served."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import os
import re
import signal
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from extproc.config import Secret, StoreConfig
from extproc.stack import LOCAL_DIR, LocalStack
from extproc.store.redis import RedisStore
from tests.e2e.fault_clients import CLIENTS, ClientKind, Fault, Outcome, Plan, drive
from tests.redis_fixtures import RedisServer

PAYER = "demo-premium-key"  # bob: limits too large to refuse anyone in the fault runs
PAYER_USER = "bob"
LIMITED = "demo-free-key"  # alice: the overshoot runs' token limit
LIMITED_USER = "alice"
TOKEN_LIMIT = 200  # the case: 60-word prompts, max_tokens 40, a 200-token window
WORKERS = 2
_SETTLE_TIMEOUT_S = 15.0
# How long a signalled worker's successor may take to listen: a bounded wait, not a speed claim
# (the figure itself is Figures.restart_s, printed by make soak).
_RESTART_WAIT_S = 15.0
_HUGE = 1_000_000_000

# ------------------------------------------------------------------------------------ the rig


def fault_config(workdir: Path) -> Path:
    """The local config with limits for the runs: bob is never refused, alice has a 200-token
    window long enough that every overshoot request lands in it (requests are not limited)."""
    raw: dict[str, Any] = yaml.safe_load((LOCAL_DIR / "config.yaml").read_text())
    raw["identity"]["api_keys_file"] = str(LOCAL_DIR / raw["identity"]["api_keys_file"])
    raw["tiers"]["file"] = str(LOCAL_DIR / raw["tiers"]["file"])
    big = {"requests": 0, "tokens": _HUGE, "tokens_window": "10m"}
    raw["limits"]["tiers"] = {
        "free": {"requests": 0, "tokens": TOKEN_LIMIT, "tokens_window": "10m"},
        "premium": big,
        "enterprise": big,
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@dataclass
class Rig:
    """redis-server with appendonly (a restart keeps the ledger) and a LocalStack on it (logging to
    a maas-stack-* folder, so tests/e2e/conftest.py checks its logs for tracebacks)."""

    workdir: Path
    redis: RedisServer = field(init=False)
    stack: LocalStack = field(init=False)

    def __post_init__(self) -> None:
        self.redis = RedisServer(self.workdir / "redis", 0, "--appendonly", "yes")
        self.stack = LocalStack(
            config_path=fault_config(self.workdir),
            workers=WORKERS,
            env={"MAAS_EXTPROC_STORE_URL": self.redis.url},
        )

    def start(self) -> Rig:
        try:
            self.redis.start()
            self.stack.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stops everything, also a Redis left stopped by a stall."""
        try:
            self.stack.stop()
        finally:
            if self.redis.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    self.redis.process.send_signal(signal.SIGCONT)
            self.redis.stop()


@contextlib.contextmanager
def running_rig(workdir: Path) -> Iterator[Rig]:
    rig = Rig(workdir).start()
    try:
        yield rig
    finally:
        rig.stop()


# ------------------------------------------------------------------------------ the processes


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux: /proc/<pid>/task/*/children)."""
    found: list[int] = []
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                found += [int(c) for c in (task / "children").read_text().split()]
    return found


def listening_ports(pid: int) -> set[int]:
    """TCP ports ``pid`` listens on: its socket inodes matched in its /proc/net/tcp{,6}."""
    inodes: set[str] = set()
    with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(FileNotFoundError, OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def workers(stack: LocalStack) -> dict[int, int]:
    """Worker index -> pid, for the sidecar parent's children that listen on a worker port."""
    parent = stack.procs["sidecar"].pid
    found: dict[int, int] = {}
    for child in children(parent):
        for index, port in enumerate(stack.sidecar_ports):
            if port in listening_ports(child):
                found[index] = child
    return found


def wait_workers(stack: LocalStack, timeout_s: float, gone: Iterable[int] = ()) -> dict[int, int]:
    """Every worker port served by a live child none of which is in ``gone``; {} on timeout."""
    old = set(gone)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = workers(stack)
        if len(found) == len(stack.sidecar_ports) and not old & set(found.values()):
            return found
        time.sleep(0.05)
    return {}


def signal_worker(stack: LocalStack, index: int, signum: int) -> int:
    pid = workers(stack)[index]
    os.kill(pid, signum)
    return pid


def kill_redis(redis: RedisServer) -> None:
    """SIGKILL: no shutdown save, only what the append-only file already holds survives."""
    assert redis.process is not None
    redis.process.kill()
    redis.process.wait()
    redis.process = None


# ------------------------------------------------------------------------------------ faults


async def _pause(over: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less once the traffic is over."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(over.wait(), seconds)


def redis_slow(redis: RedisServer, pause_ms: int = 450, gap_s: float = 0.03) -> Fault:
    """Redis holds writes (CLIENT PAUSE WRITE) ``pause_ms`` at a time, nearly back to back, until
    the traffic is over: a settle waits up to that long, mostly inside the 0.5 s store timeout."""

    async def fault(over: asyncio.Event) -> None:
        while not over.is_set():
            await asyncio.to_thread(redis.cli_command, "CLIENT", "PAUSE", str(pause_ms), "WRITE")
            await _pause(over, pause_ms / 1000 + gap_s)

    return fault


def redis_restarts(redis: RedisServer, down_s: float = 0.5, up_s: float = 1.5) -> Fault:
    """SIGKILL, ``down_s`` later start again on the same port, every ``up_s``, until the end."""

    async def fault(over: asyncio.Event) -> None:
        while not over.is_set():
            kill_redis(redis)
            await asyncio.sleep(down_s)
            await asyncio.to_thread(redis.start)
            await _pause(over, up_s)

    return fault


STALLS = (0.8, 0.3, 1.0, 0.6, 0.9, 0.2, 0.7)  # seconds; the store timeout is 0.5 s


def redis_stalls(redis: RedisServer, gap_s: float = 0.3) -> Fault:
    """SIGSTOP for each of ``STALLS`` in turn, SIGCONT between, until the traffic is over; never
    leaves Redis stopped."""

    async def fault(over: asyncio.Event) -> None:
        assert redis.process is not None
        index = 0
        while not over.is_set():
            redis.process.send_signal(signal.SIGSTOP)
            try:
                await asyncio.sleep(STALLS[index % len(STALLS)])
            finally:
                redis.process.send_signal(signal.SIGCONT)
            index += 1
            await _pause(over, gap_s)

    return fault


def worker_signal(stack: LocalStack, index: int, signum: int, restarts: list[float]) -> Fault:
    """Signal worker ``index``; record the seconds until a new worker listens on its port."""

    async def fault(_over: asyncio.Event) -> None:
        pid = signal_worker(stack, index, signum)
        started = time.monotonic()
        back = await asyncio.to_thread(wait_workers, stack, _RESTART_WAIT_S, [pid])
        restarts.append(time.monotonic() - started if back else math.inf)

    return fault


# ----------------------------------------------------------------------------------- traffic


def plans(
    run: str,
    count: int,
    *,
    clients: Sequence[ClientKind] = CLIENTS,
    delay_ms: int = 0,
    abort_every: int = 0,
) -> list[Plan]:
    """``count`` requests for bob, round-robin over ``clients``; every ``abort_every``-th one hangs
    up after 3 events; one in 7 is not streamed, one in 5 leaves include_usage to the sidecar."""
    out = []
    for i in range(count):
        stream = i % 7 != 6
        aborts = stream and abort_every > 0 and i % abort_every == 0
        out.append(
            Plan(
                model=f"f-{run}-{i}",
                client=clients[i % len(clients)],
                key=PAYER,
                stream=stream,
                max_tokens=12 + i % 9 if aborts else 2 + i % 11,
                prompt_words=3 + i % 13,
                include_usage=i % 5 != 4,
                abort_after=3 if aborts else None,
                delay_ms=max(delay_ms, 25) if aborts else delay_ms,
            )
        )
    return out


def overshoot_plans(run: str, count: int) -> list[Plan]:
    """The issue's case: alice's prompt-heavy streams (60 words, max_tokens 40), all at once."""
    return [
        Plan(
            model=f"o-{run}-{i}",
            client=CLIENTS[i % len(CLIENTS)],
            key=LIMITED,
            max_tokens=40,
            prompt_words=60,
            delay_ms=10,
        )
        for i in range(count)
    ]


def run_traffic(
    rig: Rig,
    todo: Sequence[Plan],
    concurrency: int,
    fault: Fault | None = None,
    fault_at: int = 0,
) -> list[Outcome]:
    return asyncio.run(drive(rig.stack.url, todo, concurrency, fault, fault_at))


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


# ------------------------------------------------------------------------------- scenarios


def close_after_done(
    rig: Rig, run: str, count: int, clients: Sequence[ClientKind] = CLIENTS
) -> Figures:
    """Every client hangs up the moment it has ``[DONE]`` while Redis is slow to take writes (as
    under load): the settle is still running when Envoy resets the stream."""
    todo = plans(run, count, clients=clients)
    outcomes = run_traffic(rig, todo, concurrency=8, fault=redis_slow(rig.redis))
    return figures_of(rig, outcomes)


def client_aborts(rig: Rig, run: str, count: int) -> Figures:
    """Every other stream is paced and abandoned after three events."""
    outcomes = run_traffic(rig, plans(run, count, abort_every=2), concurrency=8)
    return figures_of(rig, outcomes)


def redis_killed(rig: Rig, run: str, count: int) -> Figures:
    """Redis SIGKILLed and started again (appendonly) 0.5 s later, every 1.5 s."""
    todo = plans(run, count, delay_ms=5, abort_every=9)
    fault = redis_restarts(rig.redis)
    outcomes = run_traffic(rig, todo, concurrency=8, fault=fault, fault_at=8)
    return figures_of(rig, outcomes)


def redis_stalled(rig: Rig, run: str, count: int) -> Figures:
    """Redis frozen (SIGSTOP) for 0.2-1 s at a time, over and over, under fast traffic."""
    fault = redis_stalls(rig.redis)
    outcomes = run_traffic(rig, plans(run, count), concurrency=8, fault=fault, fault_at=8)
    return figures_of(rig, outcomes)


def worker_fault(rig: Rig, run: str, count: int, signum: int) -> Figures:
    """One worker signalled mid-traffic; it must be back on its port, and a second wave after it
    served and charged in full, with both workers logging as workers."""
    index = 1 if signum == signal.SIGKILL else 0
    if not wait_workers(rig.stack, 10):
        return Figures(problems=[f"workers not found: {workers(rig.stack)}"])
    restarts: list[float] = []
    todo = plans(run, count, delay_ms=15, abort_every=9)
    fault = worker_signal(rig.stack, index, signum, restarts)
    outcomes = run_traffic(rig, todo, concurrency=8, fault=fault, fault_at=count // 3)
    figures = figures_of(rig, outcomes, unsettled_ok=signum == signal.SIGKILL)
    figures.restart_s = restarts[0]
    if math.isinf(figures.restart_s):
        figures.problems.append(
            f"worker {index} not back on its port after {_RESTART_WAIT_S} s: now "
            f"{workers(rig.stack)}, sidecar exit {rig.stack.procs['sidecar'].poll()}"
        )
        return figures
    second = run_traffic(rig, plans(f"{run}-after", 12), concurrency=4)
    again = figures_of(rig, second)
    if again.completed != len(second):
        again.problems.append(f"after the restart only {again.completed}/{len(second)} completed")
    figures.add(again)
    figures.problems += worker_log_problems(rig.stack)
    return figures


def worker_log_problems(stack: LocalStack) -> list[str]:
    """Each worker logs INFO lines with a timestamp, the level and ``worker=N``."""
    log = stack.log("sidecar")
    problems = []
    for index in range(WORKERS):
        line = re.compile(
            rf"^\d{{4}}-\d\d-\d\d[ T]\d\d:\d\d:\d\d\S*\s.*\bINFO\b.*\bworker={index}\b", re.M
        )
        if not line.search(log):
            problems.append(f"no timestamped INFO line with worker={index} in sidecar.log")
    return problems


def overshoot_run(rig: Rig, run: str, count: int) -> Figures:
    """The issue's case: ``count`` prompt-heavy requests at once against alice's 200 tokens."""
    outcomes = run_traffic(rig, overshoot_plans(run, count), concurrency=count)
    figures = figures_of(rig, outcomes)
    if figures.overshoot > 1:
        figures.problems.append(
            f"charged {figures.charged_tokens} tokens against a limit of {TOKEN_LIMIT}: "
            f"{figures.overshoot:.2f} reservations over"
        )
    return figures
