"""`maas-extproc demo --era subscriptions` (`make run ERA=subscriptions`): offline, with the
maas-api stand-in; every line it prints to paste works as printed, and Ctrl-C stops it all."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from tests.e2e.test_demo import commands, ctrl_c_stops_every_child, run, running_demo

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def demo() -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    yield from running_demo("--era", "subscriptions")


def test_every_printed_command_works_as_printed(
    demo: tuple[subprocess.Popen[str], list[str]],
) -> None:
    _, lines = demo
    key, multiple, chosen, spoofed, usage = commands(lines)
    out = run(key)
    assert out.startswith("HTTP/1.1 200")
    assert "x-ratelimit-limit: 100" in out
    assert run(multiple).startswith("HTTP/1.1 403")
    out = run(chosen)
    assert out.startswith("HTTP/1.1 200")
    assert "x-ratelimit-limit: 5000" in out
    assert run(spoofed).startswith("HTTP/1.1 403")
    rows = json.loads(run(usage))["rows"]
    assert rows == [] or all("subscription" in row for row in rows)


def test_ctrl_c_stops_every_child(demo: tuple[subprocess.Popen[str], list[str]]) -> None:
    ctrl_c_stops_every_child(*demo)
