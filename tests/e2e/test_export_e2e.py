"""Export through the real gateway: Envoy, the sidecar and the simulator on a Redis that fsyncs
every write. One completed response makes exactly one record; records and their CloudEvents
survive a Redis SIGKILL and a sidecar restart, with no loss and no duplicate against the
simulator's record of what it served."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from extproc.stack import LocalStack
from tests.e2e.faults_support import kill_redis, signal_worker, wait_workers
from tests.e2e.support import sim_records
from tests.helpers import CHAT, KEYS
from tests.redis_fixtures import RedisServer

pytestmark = pytest.mark.redis


@dataclass
class Receiver:
    """A CloudEvents receiver written from the HTTP binding (structured mode: the body is the
    event, Content-Type application/cloudevents+json; cloudevents/spec,
    cloudevents/bindings/http-protocol-binding.md §3.2, commit 83a8bd9150de032b4788be72341c5f5f767df92e).
    Answers 503 to its first ``fail_first`` requests."""

    fail_first: int = 3
    events: list[dict[str, Any]] = field(default_factory=list)
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def serve(self) -> tuple[ThreadingHTTPServer, str]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    if receiver.refused < receiver.fail_first:
                        receiver.refused += 1
                        status = 503
                    elif self.headers.get("Content-Type", "").startswith(
                        "application/cloudevents+json"
                    ):
                        receiver.events.append(json.loads(body))
                        status = 202
                    else:
                        status = 415
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, f"http://127.0.0.1:{server.server_address[1]}/events"


@dataclass
class Gateway:
    stack: LocalStack
    redis: RedisServer
    receiver: Receiver


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    redis = RedisServer(
        tmp_path_factory.mktemp("export-redis"), 0, "--appendonly", "yes", "--appendfsync", "always"
    )
    redis.start()
    receiver = Receiver()
    http_server, url = receiver.serve()
    env = {
        "MAAS_EXTPROC_STORE_URL": redis.url,
        "MAAS_EXTPROC_EXPORT_CLOUDEVENTS_URL": url,
        "MAAS_EXTPROC_EXPORT_CLOUDEVENTS_RETRY_INITIAL_S": "0.05",
        "MAAS_EXTPROC_EXPORT_CLOUDEVENTS_RETRY_MAX_S": "0.5",
    }
    try:
        with LocalStack(env=env) as stack:
            yield Gateway(stack, redis, receiver)
    finally:
        http_server.shutdown()
        redis.stop()


def chat(stack: LocalStack, model: str, stream: bool = False) -> int:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": 6,
        "messages": [{"role": "user", "content": "count the words in this sentence"}],
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    response = httpx.post(
        stack.url + CHAT,
        json=body,
        headers={"Authorization": f"Bearer {KEYS['premium']}"},
        timeout=15,
    )
    return response.status_code


def export_run(redis: RedisServer, group: str) -> list[dict[str, Any]]:
    """Every record, through `maas-extproc export` as a process (a new group, from the start)."""
    done = subprocess.run(
        [sys.executable, "-m", "extproc", "export", "--group", group, "--from-start"],
        capture_output=True,
        text=True,
        env={**os.environ, "MAAS_EXTPROC_STORE_URL": redis.url},
        timeout=60,
        check=True,
    )
    return [json.loads(line) for line in done.stdout.splitlines()]


def served(stack: LocalStack, prefix: str) -> dict[str, dict[str, Any]]:
    return {
        str(r["model"]): r
        for r in sim_records(stack)
        if str(r["model"]).startswith(prefix) and r["completed"]
    }


def wait_for(check: Any, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_a_completed_response_yields_exactly_one_record(gateway: Gateway) -> None:
    model = f"one-{uuid.uuid4().hex[:8]}"
    assert chat(gateway.stack, model) == 200
    truth = served(gateway.stack, model)[model]
    found = [r for r in export_run(gateway.redis, f"g-{model}") if r["model"] == model]
    assert len(found) == 1
    got = found[0]
    assert (got["user"], got["plan"], got["era"], got["status"]) == ("bob", "premium", "tiers", 200)
    assert (got["prompt_tokens"], got["completion_tokens"], got["total_tokens"]) == (
        truth["prompt_tokens"],
        truth["completion_tokens"],
        truth["total_tokens"],
    )
    assert got["charged_tokens"] == truth["total_tokens"]
    assert got["estimated"] is False
    assert got["request_id"]
    assert abs(got["time_ms"] - time.time() * 1000) < 60_000
    assert got["time"].endswith("Z")
    # Its CloudEvent, after the receiver's first refusals, carries the same record.
    wait_for(lambda: any(e["data"]["model"] == model for e in gateway.receiver.events))
    event = next(e for e in gateway.receiver.events if e["data"]["model"] == model)
    assert event["id"] == got["request_id"]
    assert event["specversion"] == "1.0"
    assert event["data"] == {k: v for k, v in got.items() if k not in ("stream", "stream_id")}


def test_records_survive_a_redis_kill_and_a_sidecar_restart(gateway: Gateway) -> None:
    prefix = f"rs-{uuid.uuid4().hex[:6]}-"
    stack, redis = gateway.stack, gateway.redis
    n = 0

    def traffic(count: int) -> None:
        nonlocal n
        for _ in range(count):
            assert chat(stack, f"{prefix}{n}", stream=n % 2 == 1) == 200
            n += 1

    traffic(4)
    kill_redis(redis)  # SIGKILL: only the append-only file survives
    traffic(3)  # admitted fail-open; their charges wait in the spool
    redis.start()
    traffic(3)
    old = signal_worker(stack, 0, signal.SIGTERM)  # a graceful restart of the sidecar
    assert wait_workers(stack, 30, gone=[old])
    traffic(4)
    truth = served(stack, prefix)
    assert len(truth) == n

    def records() -> list[dict[str, Any]]:
        return [r for r in export_run(redis, f"g-{uuid.uuid4().hex}") if r["model"] in truth]

    wait_for(lambda: len(records()) >= n)  # the spool replays with backoff
    got = records()
    assert sorted(r["model"] for r in got) == sorted(truth)  # each exactly once
    for r in got:
        assert r["total_tokens"] == truth[r["model"]]["total_tokens"]
    assert len({r["request_id"] for r in got}) == n
    # CloudEvents: none lost across both faults (delivery is at least once: a restart between
    # a POST and its acknowledgement may send one again).
    wait_for(lambda: {e["data"]["model"] for e in gateway.receiver.events} >= set(truth))
    sent = [e["data"]["model"] for e in gateway.receiver.events if e["data"]["model"] in truth]
    assert set(sent) == set(truth)
    assert len(sent) - len(set(sent)) <= 1


def test_the_export_cli_help_names_its_options(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "extproc", "export", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    for option in ("--group", "--consumer", "--format", "--output", "--follow", "--from-start"):
        assert option in done.stdout
