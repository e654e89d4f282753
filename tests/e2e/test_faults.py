"""Faults against the whole gateway (issue 12): real Envoy, two sidecar workers, redis-server with
appendonly, the official openai client. Every completed response must be charged exactly what the
simulator served, every aborted stream a flagged estimate, nothing twice, and a token limit may be
passed by one reservation at most. `make soak` runs the same scenarios at size."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import fault_scenarios as scenarios
from tests.e2e.fault_clients import CLIENTS, ClientKind
from tests.e2e.fault_ledger import Figures
from tests.e2e.faults_support import Rig, running_rig

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


# Every fault in both layouts: `lean`, the default, and `full`, the STREAMED fallback.
LAYOUTS = ["lean", "full"]


@pytest.fixture(scope="module", params=LAYOUTS)
def rig(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Rig]:
    """One rig per layout for the faults that leave it as it was (the clients' own)."""
    with running_rig(tmp_path_factory.mktemp("faults"), request.param) as running:
        yield running


@pytest.fixture(params=LAYOUTS)
def own_rig(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Rig]:
    """A rig for one test, free to break."""
    with running_rig(tmp_path, request.param) as running:
        yield running


def run_id() -> str:
    return uuid.uuid4().hex[:8]


def assert_clean(figures: Figures) -> None:
    assert (figures.lost, figures.double, figures.problems) == (0, 0, []), figures.report()
    assert figures.completed > 0, figures.report()


@pytest.mark.parametrize("client", CLIENTS)
def test_a_client_closing_right_after_done_is_charged_exactly(rig: Rig, client: ClientKind) -> None:
    assert_clean(scenarios.close_after_done(rig, run_id(), 48, clients=[client]))


def test_a_client_aborting_mid_stream_is_charged_a_flagged_estimate(rig: Rig) -> None:
    figures = scenarios.client_aborts(rig, run_id(), 30)
    assert_clean(figures)
    assert figures.aborted > 0, figures.report()


def test_prompt_heavy_requests_pass_the_token_limit_by_one_reservation_at_most(
    rig: Rig,
) -> None:
    figures = scenarios.overshoot_run(rig, run_id(), 50)
    assert_clean(figures)
    assert figures.refused > 0, figures.report()  # the limit did bite
    assert figures.overshoot <= 1, figures.report()


def test_redis_killed_and_restarted_mid_traffic(own_rig: Rig) -> None:
    assert_clean(scenarios.redis_killed(own_rig, run_id(), 200))


def test_redis_stalled_again_and_again(own_rig: Rig) -> None:
    assert_clean(scenarios.redis_stalled(own_rig, run_id(), 400))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_worker_signalled_mid_traffic_is_restarted_and_nothing_is_lost(
    own_rig: Rig, signum: int
) -> None:
    figures = scenarios.worker_fault(own_rig, run_id(), 90, signum)
    assert_clean(figures)
