"""`maas-extproc usage` as a process against a real Redis: same rows and totals as the usage API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import httpx
import pytest

from extproc.store.redis import RedisStore
from tests.helpers import LOCAL
from tests.integration.test_usage_api import (
    ALICE,
    HOSTILE,
    REDIS_DB,
    TODAY,
    YESTERDAY,
    entry,
    first_column,
    redis_store,
    seed,
    serving,
)
from tests.redis_fixtures import RedisServer

pytestmark = pytest.mark.redis


def usage_cli_bytes(server: RedisServer, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {
        **os.environ,
        "MAAS_EXTPROC_STORE_URL": f"redis://127.0.0.1:{server.port}/{REDIS_DB}",
        "MAAS_EXTPROC_STORE_RETENTION_DAYS": "30",
    }
    return subprocess.run(
        [sys.executable, "-m", "extproc", "usage", "--config", str(LOCAL / "config.yaml"), *args],
        capture_output=True,
        env=env,
        timeout=30,
        check=False,
    )


def usage_cli(server: RedisServer, *args: str) -> subprocess.CompletedProcess[str]:
    done = usage_cli_bytes(server, *args)
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


@pytest.fixture
async def seeded(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    redis_server.cli_command("-n", str(REDIS_DB), "flushdb")
    store = redis_store(redis_server.port)
    await seed(store)
    yield store
    await store.close()


@pytest.mark.parametrize("group_by", ["day", "model"])
async def test_json_is_the_api_document(
    redis_server: RedisServer, seeded: RedisStore, group_by: str
) -> None:
    period = ["--from", YESTERDAY.isoformat()]
    done = usage_cli(
        redis_server, "--user", "alice", *period, "--group-by", group_by, "--format", "json"
    )
    assert done.returncode == 0, done.stderr
    api, url = await serving(seeded)
    try:
        params = {"from": YESTERDAY.isoformat(), "group_by": group_by}
        async with httpx.AsyncClient(base_url=url) as http:
            answer = (await http.get("/v1/usage", params=params, headers=ALICE)).json()
    finally:
        await api.stop()
    assert json.loads(done.stdout) == answer
    assert answer["totals"]["total_tokens"] == 24


async def test_table_and_csv(redis_server: RedisServer, seeded: RedisStore) -> None:
    period = ["--from", YESTERDAY.isoformat()]
    table = usage_cli(redis_server, "--user", "alice", *period)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[0] == "day"
    assert lines[-1].split() == ["total", "14", "10", "24", "0", "3", "40", "1", *"----", "0"]
    as_csv = usage_cli(redis_server, "--user", "alice", *period, "--format", "csv")
    assert as_csv.stdout.splitlines()[1:] == [
        f"{YESTERDAY.isoformat()},10,5,15,0,1,0,0,,,,,0",
        f"{TODAY.isoformat()},4,5,9,0,2,40,1,,,,,0",
    ]


async def test_csv_model_cells_never_start_a_formula(
    redis_server: RedisServer, seeded: RedisStore
) -> None:
    for name in HOSTILE:
        await seeded.settle([], entry("alice", TODAY, name, 1, 1), 1)
    done = usage_cli(redis_server, "--user", "alice", "--group-by", "model", "--format", "csv")
    assert done.returncode == 0, done.stderr
    assert sorted(first_column(done.stdout)) == sorted(
        ["llama", "opt", *("'" + name for name in HOSTILE)]
    )


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--from", "2025-02-30"], "--from"),
        (["--from", "2025-03-02", "--to", "2025-03-01"], "--to"),
        (["--from", "2000-01-01"], "--from"),  # before store.retention_days
    ],
)
def test_bad_dates_exit_2_naming_the_flag(
    redis_server: RedisServer, args: list[str], key: str
) -> None:
    done = usage_cli(redis_server, "--user", "alice", *args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert f"config error: {key}: expected" in done.stderr


def usage_cli_without_config(server: RedisServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MAAS_EXTPROC_STORE_URL": f"redis://127.0.0.1:{server.port}/{REDIS_DB}"}
    return subprocess.run(
        [sys.executable, "-m", "extproc", "usage", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


async def test_no_config_file_is_needed_only_the_store_url(
    redis_server: RedisServer, seeded: RedisStore
) -> None:
    done = usage_cli_without_config(redis_server, "--user", "alice", "--format", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["user"] == "alice"
    assert json.loads(done.stdout)["totals"]["total_tokens"] > 0
