"""The hot path's Redis connection: RESP on one socket, every command of an event-loop turn in one write.

``admit`` and ``settle`` are one EVALSHA each. Through redis-py each costs about 80-110 µs of
CPU here (connection pool, command packing and parsing in Python, a write and a read per call);
on one long-lived socket with hiredis parsing the replies it costs about 12-20 µs (micro-measure
in docs/benchmarks.md). Commands issued during one turn of the event loop by concurrent requests
leave in one ``write`` (implicit pipelining, as Envoy's own rate-limit service does with its
pipeline window), and replies come back in order on the same socket (RESP2, the Redis protocol
spec: a server answers a connection's commands in the order it received them).

Failure semantics match the redis-py client this replaces on the hot path:
- every failure raises a ``redis.exceptions`` error (``NoScriptError`` for ``NOSCRIPT``), so
  ``RedisStore`` maps it as before;
- a command is sent again on a fresh connection only when the connection was already known to be
  gone before it was written (a restarted server); a command in flight when the connection breaks
  fails, since it may have been applied (settles carry an id and are replayed from the spool);
- ``timeout_s``: when the oldest command has waited that long, every pending command fails and
  the connection is dropped (a reply that comes late would otherwise answer the wrong command).

Only standalone servers (``redis://``, ``rediss://``) take this path; Cluster and Sentinel keep
redis-py's clients, which know their topology.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Arg = bytes | str | int

# URL query options this connection understands; any other keeps the URL on redis-py.
_TLS_OPTIONS = {
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
}
_KNOWN = {"host", "port", "db", "username", "password", "connection_class", *_TLS_OPTIONS}


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how to connect: parsed from a redis:// or rediss:// URL.

    TLS files are read when connecting, as redis-py does: a bad file is a failed connection
    (and ``check-config`` reads them itself), not an error while the store is built.
    """

    host: str
    port: int
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: tuple[tuple[str, str], ...] | None = None  # the URL's ssl_* options; None: plaintext

    @classmethod
    def from_url(cls, url: str) -> Target | None:
        """The target of a standalone URL; None when only redis-py can serve it."""
        scheme = url.partition("://")[0]
        if scheme not in ("redis", "rediss"):
            return None
        options: dict[str, Any] = dict(parse_url(url))
        if set(options) - _KNOWN or "path" in options:
            return None
        tls = None
        if scheme == "rediss":
            tls = tuple(sorted((k, str(v)) for k, v in options.items() if k in _TLS_OPTIONS))
        return cls(
            host=str(options.get("host", "localhost")),
            port=int(options.get("port", 6379)),
            db=int(options.get("db", 0) or 0),
            username=options.get("username"),
            password=options.get("password"),
            tls=tls,
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for ``rediss://``, built from its options (raises on a bad file)."""
        if self.tls is None:
            return None
        options = dict(self.tls)
        context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
        if options.get("ssl_certfile"):
            context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
        if options.get("ssl_cert_reqs", "required").lower() in ("none", "optional"):
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif options.get("ssl_check_hostname", "true").lower() in ("false", "0"):
            context.check_hostname = False
        return context


def pack(args: Sequence[Arg]) -> bytes:
    """One command in RESP: an array of bulk strings (hiredis packs it in C)."""
    return bytes(hiredis.pack_command(tuple(args)))  # type: ignore[arg-type]  # stub says 1-tuple


def _error_of(reply: hiredis.ReplyError) -> ResponseError:
    """The ``redis.exceptions`` error redis-py raises for an error reply."""
    message = str(reply)
    return NoScriptError(message) if message.startswith("NOSCRIPT") else ResponseError(message)


class _Protocol(asyncio.Protocol):
    """One socket: batches writes per loop turn, hands replies to the waiting commands in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._outgoing: list[bytes] = []
        self._flush_scheduled = False
        self.pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self.pending
        while (reply := reader.gets()) is not False:
            if not pending:  # a reply nobody waits for: the stream is out of step
                self.fail(RedisConnectionError("redis sent a reply nobody asked for"))
                return
            future, _ = pending.popleft()
            if future.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(_error_of(reply))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"redis connection lost: {type(exc).__name__}"))

    def send(self, command: bytes) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self._loop.create_future()
        self.pending.append((future, time.monotonic()))
        self._outgoing.append(command)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._outgoing and self._transport is not None and not self.closed:
            self._transport.write(b"".join(self._outgoing))
        self._outgoing.clear()

    def fail(self, exc: Exception) -> None:
        """Fail every pending command and drop the connection: nothing after this is trusted."""
        self.closed = True
        pending, self.pending = self.pending, deque()
        for future, _ in pending:
            if not future.done():
                future.set_exception(exc)
        self._outgoing.clear()
        if self._transport is not None:
            self._transport.close()


class PipelinedConnection:
    """Sends commands on one socket (reconnected when needed); see the module docstring."""

    def __init__(self, target: Target, timeout_s: float | None) -> None:
        self._target = target
        self._timeout_s = timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    def execute(self, *args: Arg) -> Awaitable[Any]:
        """Send one command; its reply, or a ``redis.exceptions`` error.

        Not a coroutine: on a connected socket this is the command's future itself, which the
        socket completes with the reply or its error (one coroutine less per command)."""
        command = pack(args)
        protocol = self._protocol
        if protocol is None or protocol.closed:
            return self._execute_connected(command)
        return protocol.send(command)

    async def _execute_connected(self, command: bytes) -> Any:
        protocol = await self._connect()
        return await protocol.send(command)

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._protocol is not None:
            self._protocol.fail(RedisConnectionError("connection closed"))
            self._protocol = None

    async def _connect(self) -> _Protocol:
        """One connection attempt at a time; concurrent callers wait for the same one."""
        if self._connecting is not None:
            return await asyncio.shield(self._connecting)
        loop = asyncio.get_running_loop()
        self._connecting = loop.create_future()
        try:
            protocol = await self._open(loop)
        except BaseException as exc:
            error = exc if isinstance(exc, RedisConnectionError) else None
            error = error or RedisConnectionError(f"cannot connect to redis: {type(exc).__name__}")
            self._connecting.set_exception(error)
            self._connecting.exception()  # retrieved: no "never retrieved" warning
            self._connecting = None
            raise error from None
        self._connecting.set_result(protocol)
        self._connecting = None
        self._protocol = protocol
        return protocol

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Protocol:
        target = self._target
        try:
            context = target.ssl_context()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise RedisConnectionError(
                f"redis TLS settings unusable: {type(exc).__name__}"
            ) from None
        opening = loop.create_connection(
            lambda: _Protocol(loop),
            target.host,
            target.port,
            ssl=context,
            server_hostname=target.host if context else None,
        )
        _, protocol = await asyncio.wait_for(opening, self._timeout_s)
        hello: list[asyncio.Future[Any]] = []
        if target.password:
            auth = ("AUTH", target.username, target.password) if target.username else None
            hello.append(protocol.send(pack(auth or ("AUTH", target.password))))
        if target.db:
            hello.append(protocol.send(pack(("SELECT", target.db))))
        setup = asyncio.gather(*hello, return_exceptions=True)
        for reply in await asyncio.wait_for(setup, self._timeout_s):
            if isinstance(reply, ResponseError):
                protocol.fail(RedisConnectionError("redis refused the connection's setup"))
                raise RedisConnectionError(f"redis setup failed: {str(reply).split(' ', 1)[0]}")
            if isinstance(reply, BaseException):
                raise reply
        self._arm_watchdog()
        return protocol

    def _arm_watchdog(self) -> None:
        """Check every half timeout that the oldest command is not older than the timeout."""
        if self._timeout_s is None or self._watchdog is not None:
            return
        interval = self._timeout_s / 2
        loop = asyncio.get_running_loop()

        def check() -> None:
            protocol = self._protocol
            if protocol is not None and protocol.pending:
                _, sent = protocol.pending[0]
                if self._timeout_s is not None and time.monotonic() - sent > self._timeout_s:
                    protocol.fail(RedisTimeoutError("redis did not answer in time"))
            self._watchdog = loop.call_later(interval, check)

        self._watchdog = loop.call_later(interval, check)
