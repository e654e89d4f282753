"""`maas-extproc export` as a process against a real Redis: JSONL and CSV lines, acknowledged
once written, pending ones written again after a crash, --follow stopped by a signal."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from extproc.__main__ import main
from extproc.config import ExportStreamConfig, Secret, StoreConfig
from extproc.domain import Charge, Usage
from extproc.export import record
from extproc.export.stream import GroupReader, redis_records
from extproc.store import ledger
from extproc.store.redis import RedisStore
from tests.redis_fixtures import RedisServer, free_port

pytestmark = pytest.mark.redis

DB = 3


def url_of(server: RedisServer) -> str:
    return f"redis://127.0.0.1:{server.port}/{DB}"


def env_of(server: RedisServer) -> dict[str, str]:
    return {**os.environ, "MAAS_EXTPROC_STORE_URL": url_of(server)}


def export(server: RedisServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc", "export", *args],
        capture_output=True,
        text=True,
        env=env_of(server),
        timeout=30,
        check=False,
    )


def lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    redis_server.cli_command("-n", str(DB), "flushdb")
    made = RedisStore.from_config(
        StoreConfig(url=Secret(url_of(redis_server))), ExportStreamConfig()
    )
    yield made
    await made.close()


async def charge(store: RedisStore, user: str, request_id: str, total: int = 9) -> None:
    now = int(time.time() * 1000)
    c = Charge(user, "premium", "m1", Usage(4, total - 4, total), request_id=request_id)
    assert await store.settle(
        [],
        ledger.entry_for(c, now),
        now,
        request_id=request_id,
        record=record.encode_charge(c, now),
    )


async def test_jsonl_from_the_start_then_only_what_is_new(
    store: RedisStore, redis_server: RedisServer
) -> None:
    for n in range(3):
        await charge(store, "bob", f"r{n}", 10 + n)
    done = export(redis_server, "--group", "g", "--from-start")
    assert done.returncode == 0, done.stderr
    got = lines(done.stdout)
    assert [(r["request_id"], r["charged_tokens"]) for r in got] == [
        ("r0", 10),
        ("r1", 11),
        ("r2", 12),
    ]
    assert all(r["stream"] == "maas:export" and "-" in str(r["stream_id"]) for r in got)
    assert got[0]["cached_tokens"] is None
    assert got[0]["time"]
    await charge(store, "bob", "r3")
    # Acknowledged records are not written again: only what is new.
    assert [r["request_id"] for r in lines(export(redis_server, "--group", "g").stdout)] == ["r3"]


async def test_csv_appends_to_a_file_with_one_header_and_safe_cells(
    store: RedisStore, redis_server: RedisServer, tmp_path: Path
) -> None:
    out = tmp_path / "charges.csv"
    await charge(store, '=HYPERLINK("http://x")', "r1")
    first = export(
        redis_server, "--group", "g", "--from-start", "--format", "csv", "--output", str(out)
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout == ""
    await charge(store, "bob", "r2")
    assert (
        export(redis_server, "--group", "g", "--format", "csv", "--output", str(out)).returncode
        == 0
    )
    rows = list(csv.DictReader(io.StringIO(out.read_bytes().decode(), newline="")))
    assert [r["request_id"] for r in rows] == ["r1", "r2"]  # one header: the file was not empty
    assert rows[0]["user"] == '\'=HYPERLINK("http://x")'
    assert rows[0]["cached_tokens"] == ""
    assert rows[0]["charged_tokens"] == "9"


async def test_records_a_crashed_consumer_never_acknowledged_are_written_again(
    store: RedisStore, redis_server: RedisServer
) -> None:
    for n in range(4):
        await charge(store, "bob", f"r{n}")
    source = redis_records(url_of(redis_server), "maas:export", 5.0)
    try:  # "worker-1" read two records and died before writing them
        crashed = GroupReader(source, "g", "worker-1", from_start=True, batch=2)
        assert len(await crashed.next_batch(0)) == 2
    finally:
        await source.close()
    done = export(redis_server, "--group", "g", "--consumer", "worker-1")
    assert [r["request_id"] for r in lines(done.stdout)] == ["r0", "r1", "r2", "r3"]
    client = Redis.from_url(url_of(redis_server), decode_responses=True)
    try:
        assert (await client.xpending("maas:export", "g"))["pending"] == 0
    finally:
        await client.aclose()


async def test_follow_writes_new_records_until_a_signal(
    store: RedisStore, redis_server: RedisServer, tmp_path: Path
) -> None:
    out = tmp_path / "follow.jsonl"
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "extproc", "export", "--group", "f", "--follow"),
        *("--output", str(out)),
        env=env_of(redis_server),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        client = Redis.from_url(url_of(redis_server), decode_responses=True)
        for _ in range(200):  # the group exists once the reader started
            if await client.exists("maas:export") and await client.xinfo_groups("maas:export"):
                break
            await asyncio.sleep(0.05)
        await client.aclose()
        for n in range(3):
            await charge(store, "bob", f"f{n}")
        for _ in range(200):
            if out.exists() and len(out.read_text().splitlines()) == 3:
                break
            await asyncio.sleep(0.05)
        assert [r["request_id"] for r in lines(out.read_text())] == ["f0", "f1", "f2"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, raw_err = await asyncio.wait_for(proc.communicate(), 15)
    err = raw_err.decode()
    assert proc.returncode == 0, err
    assert "3 records" in err


def test_a_memory_store_cannot_be_exported_from_another_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MAAS_EXTPROC_STORE_URL", "memory://")
    assert main(["export"]) == 2
    assert "memory://" in capsys.readouterr().err


def test_a_dead_store_is_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MAAS_EXTPROC_STORE_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert main(["export", "--group", "g"]) == 1
    err = capsys.readouterr().err
    assert "store unavailable" in err
    assert "Traceback" not in err
    assert err.count("\n") == 1


def test_entries_that_are_not_records_are_skipped_with_one_line_each(
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    redis_server.cli_command("-n", str(DB), "flushdb")
    good = record.encode_charge(Charge("bob", "premium", "m1", Usage(1, 2, 3), request_id="ok"), 5)
    for fields in (("x", "1"), ("r", "not json"), ("r", '{"v": 0}'), ("r", good)):
        redis_server.cli_command("-n", str(DB), "xadd", "maas:export", "*", *fields)
    monkeypatch.setenv("MAAS_EXTPROC_STORE_URL", url_of(redis_server))
    assert main(["export", "--group", "g", "--from-start"]) == 0
    out, err = capsys.readouterr()
    assert [r["request_id"] for r in lines(out)] == ["ok"]
    assert err.count("skipped:") == 3
    assert "Traceback" not in err
    pending = redis_server.cli_command("-n", str(DB), "xpending", "maas:export", "g")
    assert pending.split()[0] == "0"  # skipped ones are acknowledged too: they never become records


def test_a_group_that_lagged_past_the_retention_is_told_how_many_records_it_lost(
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import redis

    redis_server.cli_command("-n", str(DB), "flushdb")
    client = redis.Redis.from_url(url_of(redis_server), decode_responses=True)
    good = record.encode_charge(Charge("bob", "premium", "m1", Usage(1, 2, 3), request_id="r"), 5)
    try:
        client.xadd("maas:export", {"r": good})
        monkeypatch.setenv("MAAS_EXTPROC_STORE_URL", url_of(redis_server))
        assert main(["export", "--group", "g", "--from-start"]) == 0
        capsys.readouterr()
        for _ in range(300):  # while the group is away, the stream keeps only the last 100
            client.xadd("maas:export", {"r": good}, maxlen=100, approximate=False)
        assert main(["export", "--group", "g"]) == 0
        out, err = capsys.readouterr()
        assert len(out.splitlines()) == 100
        assert "200 records were trimmed (export.stream.maxlen) before this group read them" in err
    finally:
        client.close()
