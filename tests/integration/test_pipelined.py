"""The hot path's pipelined Redis connection against a real redis-server: order, batching, faults."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from extproc.store.pipelined import PipelinedConnection, Target
from tests.redis_fixtures import RedisServer

pytestmark = pytest.mark.redis


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    running = RedisServer(tmp_path / "redis")
    running.start()
    yield running
    if running.process is not None:
        running.process.send_signal(signal.SIGCONT)
    running.stop()


def connection(server: RedisServer, timeout_s: float = 1.0) -> PipelinedConnection:
    target = Target.from_url(server.url)
    assert target is not None
    return PipelinedConnection(target, timeout_s)


def reads_processed(server: RedisServer) -> int:
    """Read events the server has handled (INFO stats ``total_reads_processed``)."""
    info = server.cli_command("INFO", "stats")
    line = next(x for x in info.splitlines() if x.startswith("total_reads_processed:"))
    return int(line.split(":", 1)[1])


async def test_concurrent_commands_get_their_own_replies(server: RedisServer) -> None:
    conn = connection(server)

    async def set_and_get(i: int) -> bytes:
        await conn.execute("SET", f"k{i}", i)
        return bytes(await conn.execute("GET", f"k{i}"))

    replies = await asyncio.gather(*(set_and_get(i) for i in range(300)))
    assert replies == [str(i).encode() for i in range(300)]
    await conn.close()


async def test_one_loop_turn_of_commands_is_one_write(server: RedisServer) -> None:
    conn = connection(server)
    await conn.execute("PING")  # connected
    before = reads_processed(server)
    replies = await asyncio.gather(*(conn.execute("INCR", "n") for _ in range(200)))
    after = reads_processed(server)
    assert sorted(replies) == list(range(1, 201))
    # 200 commands in one write: the server reads them in one go (two if the kernel splits it),
    # where one write per command would be 200 reads. The INFO call itself is one more.
    assert after - before <= 3
    await conn.close()


async def test_a_restarted_server_is_reconnected_to(server: RedisServer) -> None:
    conn = connection(server)
    assert await conn.execute("PING") == b"PONG"
    server.restart()
    for _ in range(50):  # the loss is seen once the loop reads the socket's end
        try:
            assert await conn.execute("PING") == b"PONG"
            break
        except RedisConnectionError:
            await asyncio.sleep(0.02)
    assert await conn.execute("PING") == b"PONG"
    await conn.close()


async def test_a_frozen_server_fails_pending_commands_after_the_timeout(
    server: RedisServer,
) -> None:
    conn = connection(server, timeout_s=0.3)
    await conn.execute("PING")
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)
    started = time.monotonic()
    try:
        with pytest.raises(RedisTimeoutError):
            await conn.execute("INCR", "n")
        assert time.monotonic() - started < 1.0
    finally:
        server.process.send_signal(signal.SIGCONT)
    assert await conn.execute("INCR", "m") == 1  # a fresh connection after the timeout
    await conn.close()


async def test_error_replies_raise_as_redis_py_does(server: RedisServer) -> None:
    conn = connection(server)
    with pytest.raises(NoScriptError):
        await conn.execute("EVALSHA", "0" * 40, 0)
    with pytest.raises(ResponseError):
        await conn.execute("INCR", "not", "a", "command")
    assert await conn.execute("PING") == b"PONG"  # the connection is still in step
    await conn.close()


def test_only_standalone_urls_take_the_pipelined_path() -> None:
    assert Target.from_url("redis://:pw@10.0.0.1:6380/2") == Target("10.0.0.1", 6380, 2, None, "pw")
    assert Target.from_url("redis+cluster://a:1,b:2") is None
    assert Target.from_url("redis+sentinel://a:1/mymaster/0") is None
    assert Target.from_url("redis://h:1/0?socket_keepalive=true") is None  # redis-py's to honour
