"""The ``serve`` parent: runs N worker processes, restarts any that exits, stops them all on SIGTERM.

A worker that dies (a crash, an OOM kill, a stray SIGTERM or SIGKILL) is started again on its own
port, as a pod restart would do, so Envoy's endpoint for it comes back. A worker that keeps dying
right after its start is restarted with a growing delay, so a broken configuration does not spin.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.context import SpawnProcess

log = logging.getLogger("extproc.supervisor")

_QUICK_EXIT_S = 5.0  # a worker that dies sooner than this after its start backs off
_MAX_BACKOFF_S = 30.0


@dataclass
class _Slot:
    index: int
    process: SpawnProcess | None = None
    started: float = 0.0
    backoff_s: float = 0.0
    restart_at: float = 0.0
    restarts: int = field(default=0)


class Supervisor:
    """Keeps ``count`` workers running ``target(index)`` until ``stop`` is called."""

    def __init__(self, count: int, target: Callable[[int], None]) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._target = target
        self._slots = [_Slot(i) for i in range(count)]
        self._stopping = False

    def run(self) -> int:
        """Start every worker and keep them running; returns once all have stopped."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for slot in self._slots:
            self._start(slot)
        while not self._stopping:
            self._watch_once(0.5)
        return self._join()

    def stop(self) -> None:
        """Forward SIGTERM to every worker; no worker is restarted from now on."""
        self._stopping = True
        for slot in self._slots:
            self._signal(slot, signal.SIGTERM)

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("stopping workers: %s", signal.Signals(signum).name)
        self.stop()

    def _start(self, slot: _Slot) -> None:
        process = self._context.Process(
            target=self._target, args=(slot.index,), name=f"worker-{slot.index}"
        )
        process.start()
        slot.process, slot.started = process, time.monotonic()
        log.info("worker %d started pid=%s", slot.index, process.pid)

    def _watch_once(self, timeout_s: float) -> None:
        alive = [s.process.sentinel for s in self._slots if s.process is not None]
        if alive:
            multiprocessing.connection.wait(alive, timeout_s)
        else:
            time.sleep(timeout_s)
        now = time.monotonic()
        for slot in self._slots:
            process = slot.process
            if process is not None and not process.is_alive():
                process.join()
                lived = now - slot.started
                slot.backoff_s = (
                    min(max(slot.backoff_s * 2, 0.5), _MAX_BACKOFF_S)
                    if lived < _QUICK_EXIT_S
                    else 0
                )
                slot.process, slot.restart_at = None, now + slot.backoff_s
                log.warning(
                    "worker %d exited code=%s after %.1fs: restarting in %.1fs",
                    slot.index,
                    process.exitcode,
                    lived,
                    slot.backoff_s,
                )
            if slot.process is None and not self._stopping and now >= slot.restart_at:
                slot.restarts += 1
                self._start(slot)

    def _join(self) -> int:
        codes = []
        for slot in self._slots:
            if slot.process is not None:
                slot.process.join()
                codes.append(slot.process.exitcode or 0)
        log.info("all workers stopped")
        return max(codes, default=0) if any(c > 0 for c in codes) else 0

    @staticmethod
    def _signal(slot: _Slot, signum: int) -> None:
        process = slot.process
        if process is not None and process.pid is not None and process.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signum)
