"""`make soak`: the fault scenarios of tests/e2e/test_scenarios.py at a chosen size, with the figures.

Each scenario runs on its own rig (redis-server with appendonly, two sidecar workers, Envoy, the
simulator) and is checked against the simulator's record as the tests check it. Exits 1 when a
response was lost or charged twice, or a token limit was passed by more than one reservation.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from tests.e2e import fault_scenarios as scenarios
from tests.e2e.fault_ledger import Figures
from tests.e2e.faults_support import Rig, running_rig

_OVERSHOOT_BATCH = 50  # the case: 50 requests at once against a 200-token window
Scenario = Callable[[Rig, str, int], Figures]


def _worker(signum: int) -> Scenario:
    def scenario(rig: Rig, run: str, count: int) -> Figures:
        return scenarios.worker_fault(rig, run, count, signum)

    return scenario


SCENARIOS: dict[str, Scenario] = {
    "close-after-done": scenarios.close_after_done,
    "client-aborts": scenarios.client_aborts,
    "redis-kill": scenarios.redis_killed,
    "redis-stall": scenarios.redis_stalled,
    "worker-sigterm": _worker(signal.SIGTERM),
    "worker-sigkill": _worker(signal.SIGKILL),
    "overshoot": scenarios.overshoot_run,
}
# Share of --requests per scenario: the slow-Redis close-after-[DONE] run takes longest.
_SHARE = {"close-after-done": 0.25}
_COLUMNS = ("requests", "completed", "aborted", "refused", "lost", "double", "unsettled")


def run_scenario(name: str, requests: int, workdir: Path) -> Figures:
    """One scenario on a fresh rig; overshoot: a fresh rig (a new window) per batch of 50, one
    batch per 200 requests."""
    if name == "overshoot":
        batches = [_OVERSHOOT_BATCH] * max(1, requests // 200)
    else:
        batches = [max(12, round(requests * _SHARE.get(name, 1.0)))]
    total = Figures()
    for index, size in enumerate(batches):
        with running_rig(workdir / f"{name}-{index}") as rig:
            total.add(SCENARIOS[name](rig, uuid.uuid4().hex[:8], size))
    return total


def _row(name: str, figures: Figures, seconds: float | None = None) -> str:
    cells = [f"{getattr(figures, column):>10}" for column in _COLUMNS]
    restart = f"{figures.restart_s:.1f}s" if figures.restart_s else "-"
    took = "" if seconds is None else f"{seconds:>8.1f}s"
    return f"{name:<17}{''.join(cells)}{figures.overshoot:>10.2f}{restart:>9}{took}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1200, help="requests per scenario")
    parser.add_argument(
        "--scenario", action="append", choices=sorted(SCENARIOS), help="repeatable; default all"
    )
    args = parser.parse_args(argv)
    names = args.scenario or list(SCENARIOS)
    head = "".join(f"{column:>10}" for column in (*_COLUMNS, "overshoot"))
    print(f"{'scenario':<17}{head}{'restart':>9}{'time':>9}")
    total = Figures()
    with tempfile.TemporaryDirectory(prefix="maas-soak-") as tmp:
        for name in names:
            started = time.monotonic()
            figures = run_scenario(name, args.requests, Path(tmp))
            print(_row(name, figures, time.monotonic() - started), flush=True)
            total.add(figures)
    print(_row("total", total))
    for line in total.problem_lines(20):
        print(line)
    failed = total.lost > 0 or total.double > 0 or total.overshoot > 1 or total.problems
    print(
        f"lost {total.lost}, double-charged {total.double}, "
        f"max overshoot {total.overshoot:.2f} reservations, "
        f"worker back in {total.restart_s:.1f} s at most: {'FAIL' if failed else 'ok'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
