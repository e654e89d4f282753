"""`maas-extproc demo` (what `make run` starts): every line it prints to paste works as printed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT


def running_demo(*args: str) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """``maas-extproc demo --port 0 ARGS``, read up to its last printed line, stopped after."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "demo", "--port", "0", *args],
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
        assert lines, "the demo printed nothing"
        assert lines[-1].startswith("Ctrl-C"), "\n".join(lines)
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def demo() -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    yield from running_demo()


def run(line: str) -> str:
    done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def commands(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith(("curl ", "for "))]


def test_every_printed_command_works_as_printed(
    demo: tuple[subprocess.Popen[str], list[str]],
) -> None:
    _, lines = demo
    cmds = commands(lines)
    assert len(cmds) == 8
    stream, plain, loop, anonymous, models, metrics, usage, users = cmds
    out = run(stream)
    assert "data: [DONE]" in out
    assert '"usage":{' in out
    out = run(plain)
    assert out.startswith("HTTP/1.1 200")
    assert "x-ratelimit-remaining" in out
    assert run(loop).split() == ["200", "200", "429"]
    assert "401" in run(anonymous)
    assert json.loads(run(models))["object"] == "list"
    assert re.search(r'^maas_tokens_total\{.*tier="premium"', run(metrics), re.MULTILINE)
    assert json.loads(run(usage))["totals"]["total_tokens"] > 0
    assert "bob" in run(users)


def test_ctrl_c_stops_every_child(demo: tuple[subprocess.Popen[str], list[str]]) -> None:
    ctrl_c_stops_every_child(*demo)


def layout_of(lines: list[str]) -> str:
    (line,) = [line for line in lines if line.strip().startswith("layout ")]
    return line.split()[1]


def test_the_default_layout_is_lean_and_says_so(
    demo: tuple[subprocess.Popen[str], list[str]],
) -> None:
    _, lines = demo
    assert layout_of(lines) == "lean"
    assert any(line.strip().startswith("sidecar HTTP") for line in lines)  # /check, /settle


def test_layout_full_runs_the_streamed_fallback() -> None:
    """`make run LAYOUT=full` is `demo --layout full`: the STREAMED layout, charged as printed."""
    with contextlib.contextmanager(running_demo)("--layout", "full") as (proc, lines):
        assert layout_of(lines) == "full"
        assert not any(line.strip().startswith("sidecar HTTP") for line in lines)
        _, plain, *_ = commands(lines)
        assert run(plain).startswith("HTTP/1.1 200")
        ctrl_c_stops_every_child(proc, lines)


def ctrl_c_stops_every_child(proc: subprocess.Popen[str], lines: list[str]) -> None:
    ports = [int(p) for line in lines for p in re.findall(r"127\.0\.0\.1:(\d+)", line)]
    assert ports
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    for port in ports:
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"


def test_the_demo_runs_from_an_installed_wheel(tmp_path: Path) -> None:
    """The local stack's files travel in the wheel: no checkout needed for `maas-extproc demo`."""
    source, wheels = tmp_path / "source", tmp_path / "wheels"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        source.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    for folder in ("extproc", "deploy/local"):  # a fresh copy: no build/ left from earlier
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(wheels), str(source)],
        check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    site = tmp_path / "site"
    (wheel,) = wheels.glob("maas_extproc-*.whl")
    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "extproc" / "local" / "config.yaml").is_file()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["PYTHONPATH"] = str(site)
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "demo", "--port", "0"],
        cwd=tmp_path,  # nowhere near a checkout
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (lines and lines[-1].startswith("Ctrl-C")):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
        assert any(line.startswith("Ctrl-C") for line in lines[-1:]), "\n".join(lines)
        answer = run(commands(lines)[0])
        assert '"usage"' in answer or '"choices"' in answer, answer
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert proc.returncode == 0
