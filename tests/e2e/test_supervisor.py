"""`serve --workers 2` as a pod runs it: a dead worker comes back, every line says who wrote it,
and SIGTERM stops everything in order."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.stack import free_ports, wait_for_port
from tests.helpers import LOCAL


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(child) for child in text]
    return found


def worker_pid(log: Path, index: int) -> int:
    """The pid the supervisor last logged for worker ``index``."""
    found = re.findall(rf"worker {index} started pid=(\d+)", log.read_text())
    assert found, "worker not started"
    return int(found[-1])


def serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        except grpc.RpcError:
            return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], list[int], Path]]:
    ports = free_ports(2)
    log = tmp_path / "sidecar.log"
    env = {
        **os.environ,
        "MAAS_EXTPROC_SERVER_PORT": str(ports[0]),
        "MAAS_EXTPROC_SERVER_METRICS_PORT": "0",
        "MAAS_EXTPROC_OBSERVABILITY_USAGE_PORT": "0",
        "MAAS_EXTPROC_SERVER_GRACE_PERIOD_S": "1",
    }
    with log.open("wb") as out:
        cmd = [sys.executable, "-m", "extproc", "serve", "--config", str(LOCAL / "config.yaml")]
        proc = subprocess.Popen(
            [*cmd, "--workers", "2"], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    try:
        for port in ports:
            wait_for_port(port, 20, proc)
        yield proc, ports, log
    finally:
        if proc.poll() is None:
            proc.terminate()  # the supervisor stops its workers; a SIGKILL would orphan them
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_worker_that_dies_is_restarted_on_its_port(
    sidecar: tuple[subprocess.Popen[bytes], list[int], Path], how: signal.Signals
) -> None:
    proc, ports, log = sidecar
    victim = worker_pid(log, 1)
    assert victim in children(proc.pid)
    os.kill(victim, how)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        replaced = [c for c in children(proc.pid) if c != victim]
        if len(replaced) >= 2 and serving(ports[1]):
            break
        time.sleep(0.1)
    assert serving(ports[1])
    assert serving(ports[0])
    assert proc.poll() is None
    text = log.read_text()
    assert re.search(r"WARNING supervisor extproc\.supervisor worker 1 exited code=", text)


def test_every_line_carries_time_level_and_worker_and_sigterm_stops_in_order(
    sidecar: tuple[subprocess.Popen[bytes], list[int], Path],
) -> None:
    proc, ports, log = sidecar
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
    for line in lines:
        assert re.match(stamp + r"(supervisor|worker=[01]) ", line), line
    for index in (0, 1):
        mine = [line.split(" extproc.", 1)[1] for line in lines if f" worker={index} " in line]
        steps = [
            "app serving grpc=",
            "app draining",
            "app settling",
            "app closing the store",
            "app stopping the usage API",
            "app stopped",
        ]
        positions = [next(i for i, m in enumerate(mine) if m.startswith(s)) for s in steps]
        assert positions == sorted(positions), mine
    for port in ports:
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0
