"""The fault rig (redis-server with appendonly behind a two-worker stack), its processes, and the
faults: Redis slowed, stalled or killed, a worker signalled."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from extproc.stack import LOCAL_DIR, LocalStack, Topology
from tests.e2e.fault_clients import Fault
from tests.redis_fixtures import RedisServer

PAYER = "demo-premium-key"  # bob: limits too large to refuse anyone in the fault runs
PAYER_USER = "bob"
LIMITED = "demo-free-key"  # alice: the overshoot runs' token limit
LIMITED_USER = "alice"
TOKEN_LIMIT = 200  # the case: 60-word prompts, max_tokens 40, a 200-token window
WORKERS = 2
# How long a signalled worker's successor may take to listen: a bounded wait, not a speed claim
# (the figure itself is Figures.restart_s, printed by make soak).
RESTART_WAIT_S = 15.0
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
    topology: Topology = "lean"  # the default layout; "full" is the STREAMED fallback
    redis: RedisServer = field(init=False)
    stack: LocalStack = field(init=False)

    def __post_init__(self) -> None:
        # appendfsync always: with everysec Redis may answer a write and then lose it to a
        # SIGKILL (it postpones the AOF write while a background fsync runs), and a charge it
        # acknowledged is never replayed. The README says so for production Redis too.
        self.redis = RedisServer(
            self.workdir / "redis", 0, "--appendonly", "yes", "--appendfsync", "always"
        )
        self.stack = LocalStack(
            config_path=fault_config(self.workdir),
            workers=WORKERS,
            env={"MAAS_EXTPROC_STORE_URL": self.redis.url},
            topology=self.topology,
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
def running_rig(workdir: Path, topology: Topology = "lean") -> Iterator[Rig]:
    rig = Rig(workdir, topology).start()
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
        back = await asyncio.to_thread(wait_workers, stack, RESTART_WAIT_S, [pid])
        restarts.append(time.monotonic() - started if back else math.inf)

    return fault
