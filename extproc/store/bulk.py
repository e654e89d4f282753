"""Batches of read commands on a socket of their own: the usage listings' reads of many hashes.

A batch is one write and one read loop, its replies parsed by hiredis, with no future or task per
command: through the hot path's ``PipelinedConnection`` each command costs a future, and through
redis-py about ten times more (docs/benchmarks.md, "Usage API over a large ledger"). One batch
at a time; any failure closes the socket (a reply that comes late would answer the wrong
command) and raises a ``redis.exceptions`` error, which ``RedisStore`` maps as it maps the rest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from extproc.store.pipelined import Arg, Target, pack


class BulkReader:
    """Sends each batch in one write, on one long-lived connection (reopened when needed)."""

    def __init__(self, target: Target, timeout_s: float | None) -> None:
        self._target = target
        self._timeout_s = timeout_s
        self._lock = asyncio.Lock()
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def read(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """The replies to ``commands``, in order; a reply error raises ``ResponseError``."""
        async with self._lock:
            # Reads can be sent again: a connection that turns out gone (a restarted server)
            # gets one retry on a fresh one.
            reused = self._streams is not None
            while True:
                try:
                    return await asyncio.wait_for(self._batch(commands), self._timeout_s)
                except TimeoutError:
                    await self.close()
                    raise RedisTimeoutError("redis did not answer a batch in time") from None
                except (OSError, RedisConnectionError):
                    await self.close()
                    if not reused:
                        raise
                    reused = False

    async def close(self) -> None:
        if self._streams is not None:
            _, writer = self._streams
            self._streams = None
            writer.close()

    async def _batch(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        stream, writer = self._streams or await self._open()
        writer.write(b"".join(pack(command) for command in commands))
        return await _replies(stream, len(commands))

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        target = self._target
        try:
            context = target.ssl_context()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise RedisConnectionError(
                f"redis TLS settings unusable: {type(exc).__name__}"
            ) from None
        stream, writer = await asyncio.open_connection(
            target.host, target.port, ssl=context, server_hostname=target.host if context else None
        )
        hello: list[tuple[Arg, ...]] = []
        if target.password:
            auth = ("AUTH", target.username, target.password) if target.username else None
            hello.append(auth or ("AUTH", target.password))
        if target.db:
            hello.append(("SELECT", target.db))
        if hello:
            writer.write(b"".join(pack(command) for command in hello))
            try:
                await _replies(stream, len(hello))
            except ResponseError as exc:
                writer.close()
                raise RedisConnectionError(
                    f"redis setup failed: {str(exc).split(' ', 1)[0]}"
                ) from None
        self._streams = (stream, writer)
        return stream, writer


async def _replies(stream: asyncio.StreamReader, count: int) -> list[Any]:
    parser = hiredis.Reader()
    replies: list[Any] = []
    while len(replies) < count:
        data = await stream.read(1 << 20)
        if not data:
            raise RedisConnectionError("redis closed the connection")
        parser.feed(data)
        while (reply := parser.gets()) is not False:
            replies.append(reply)
    for reply in replies:
        if isinstance(reply, hiredis.ReplyError):
            raise ResponseError(str(reply))
    return replies
