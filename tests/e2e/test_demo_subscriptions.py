"""`maas-extproc demo --era subscriptions` (`make run ERA=subscriptions`): offline, with the
maas-api stand-in; every line it prints to paste works as printed, and Ctrl-C stops it all."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.e2e.test_demo import commands, run
from tests.helpers import ROOT

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def demo() -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "demo", "--port", "0", "--era", "subscriptions"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "REDIS_URL"},
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith("Ctrl-C stops everything."):
            break
    try:
        assert lines[-1].startswith("Ctrl-C"), "\n".join(lines)
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)


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
    proc, lines = demo
    ports = [int(p) for line in lines for p in re.findall(r"127\.0\.0\.1:(\d+)", line)]
    assert ports
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    for port in ports:
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"
