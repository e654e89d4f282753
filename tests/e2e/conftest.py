"""A real Envoy + sidecar + simulator stack for the end-to-end tests, one per module; and the check
that no process of any stack a test ran ever wrote a traceback."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from extproc.stack import LocalStack

TRACEBACK = b"Traceback (most recent call last)"
_LOGS = ("sidecar.log", "sim.log", "envoy.log")
_OURS = f"maas-stack-{os.getpid()}-*"


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    with LocalStack() as running:
        yield running


@dataclass
class _LogWatch:
    """Every LocalStack logs to a fresh maas-stack-<pid>-* folder, named after the process that
    started it: this run's own, minus those of an earlier run that had the same pid."""

    stale: set[Path]
    checked: dict[Path, int] = field(default_factory=dict)  # how far each log has been read

    def new_tracebacks(self) -> list[str]:
        found = []
        for folder in Path(tempfile.gettempdir()).glob(_OURS):
            if folder in self.stale:
                continue
            for name in _LOGS:
                log = folder / name
                if not log.exists():
                    continue
                text = log.read_bytes()
                begin, self.checked[log] = self.checked.get(log, 0), len(text)
                if TRACEBACK in text[begin:]:
                    found.append(f"{log}:\n{text[begin:].decode(errors='replace')[-3000:]}")
        return found


@pytest.fixture(scope="session")
def _log_watch() -> _LogWatch:
    return _LogWatch(stale=set(Path(tempfile.gettempdir()).glob(_OURS)))


@pytest.fixture(autouse=True)
def no_traceback_in_any_log(_log_watch: _LogWatch) -> Iterator[None]:
    yield
    found = _log_watch.new_tracebacks()
    if found:
        pytest.fail("a traceback in a stack log:\n" + "\n".join(found), pytrace=False)
