"""The fault scenarios, shared by tests/e2e/test_faults.py and make soak (bench/soak.py): the
traffic each one sends, the fault it injects, and its figures."""

from __future__ import annotations

import asyncio
import math
import re
import signal
from collections.abc import Sequence

from extproc.stack import LocalStack
from tests.e2e.fault_clients import CLIENTS, ClientKind, Fault, Outcome, Plan, drive
from tests.e2e.fault_ledger import Figures, figures_of
from tests.e2e.faults_support import (
    LIMITED,
    PAYER,
    RESTART_WAIT_S,
    TOKEN_LIMIT,
    WORKERS,
    Rig,
    redis_restarts,
    redis_slow,
    redis_stalls,
    wait_workers,
    worker_signal,
    workers,
)

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
            f"worker {index} not back on its port after {RESTART_WAIT_S} s: now "
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
