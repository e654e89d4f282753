"""A local Limitador: Kuadrant's RateLimitService (CheckRateLimit, Report) and ``GET /limits/<ns>``.

It keeps Limitador's documented semantics: limits in its JSON shape (``namespace, max_value,
seconds, name, conditions, variables``), a limit applies when every condition holds on
``descriptors[0]`` and every variable is present there; a counter per (limit, variable values) in a
fixed window that starts at its first hit; ``Report`` adds ``hits_addend`` unconditionally (0 counts
as 1); ``CheckRateLimit`` adds nothing and answers OVER_LIMIT when counter + 1 > max. It runs on its
own thread and loop, so synchronous tests and other processes can both reach it; ``fail(True)``
makes both RPCs answer UNAVAILABLE, as Limitador does when its storage fails.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from envoy.service.ratelimit.v3 import rls_pb2

from extproc.kuadrant import service
from extproc.kuadrant.descriptors import parse_condition, parse_variable

Json = dict[str, Any]


@dataclass
class Window:
    value: int
    expires_at: float


@dataclass
class Received:
    """One Report as it arrived."""

    domain: str
    counters: tuple[tuple[str, str], ...]
    labels: tuple[tuple[str, str], ...]
    hits: int


@dataclass
class LimitadorEmulator:
    clock: Callable[[], float] = time.monotonic
    limits: list[Json] = field(default_factory=list)
    windows: dict[tuple[int, tuple[str, ...]], Window] = field(default_factory=dict)
    reports: list[Received] = field(default_factory=list)
    checks: int = 0
    grpc_port: int = 0
    http_port: int = 0
    _failing: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _stopped: asyncio.Event | None = None

    # ------------------------------------------------------------------ scripting from tests

    def set_limits(self, limits: Iterable[Json]) -> None:
        """Replace the limits (Limitador's JSON shape); counters are kept, as Limitador does."""
        with self._lock:
            self.limits = [dict(limit) for limit in limits]

    def fail(self, failing: bool) -> None:
        """True: every RPC answers UNAVAILABLE (storage down); False: serve again."""
        with self._lock:
            self._failing = failing

    def counter(self, namespace: str, name: str, *values: str) -> int:
        """The live value of limit ``name``'s counter for these variable values (0 when none)."""
        with self._lock:
            now = self.clock()
            for index, limit in enumerate(self.limits):
                if limit["namespace"] == namespace and limit.get("name") == name:
                    window = self.windows.get((index, values))
                    return window.value if window and window.expires_at > now else 0
        return 0

    def total_hits(self, labelled: bool | None = None) -> int:
        """Hits received in Reports (only those with metric labels, or without, when asked)."""
        with self._lock:
            return sum(
                r.hits for r in self.reports if labelled is None or bool(r.labels) == labelled
            )

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    # ------------------------------------------------------------------ Limitador's semantics

    def _applicable(self, request: Any) -> list[tuple[int, Json, tuple[str, ...]]]:
        entries: dict[str, str] = {}
        if request.descriptors:
            entries = {e.key: e.value for e in request.descriptors[0].entries}
        found = []
        for index, limit in enumerate(self.limits):
            if limit["namespace"] != request.domain:
                continue
            conditions = [parse_condition(c) for c in limit.get("conditions") or ()]
            if not all(c is not None and entries.get(c[0]) == c[1] for c in conditions):
                continue
            keys = [parse_variable(v) for v in limit.get("variables") or ()]
            if not all(k is not None and k in entries for k in keys):
                continue
            found.append((index, limit, tuple(entries[k] for k in keys if k is not None)))
        return found

    def _window(self, index: int, limit: Json, values: tuple[str, ...]) -> Window:
        now = self.clock()
        window = self.windows.get((index, values))
        if window is None or window.expires_at <= now:  # fixed window from the first hit
            window = self.windows[(index, values)] = Window(0, now + float(limit["seconds"]))
        return window

    def report(self, request: Any) -> None:
        hits = request.hits_addend or 1
        labels: tuple[tuple[str, str], ...] = ()
        if len(request.descriptors) > 1:
            labels = tuple((e.key, e.value) for e in request.descriptors[1].entries)
        counters: tuple[tuple[str, str], ...] = ()
        if request.descriptors:
            counters = tuple((e.key, e.value) for e in request.descriptors[0].entries)
        self.reports.append(Received(request.domain, counters, labels, hits))
        for index, limit, values in self._applicable(request):
            self._window(index, limit, values).value += hits

    def check(self, request: Any) -> int:
        self.checks += 1
        for index, limit, values in self._applicable(request):
            if self._window(index, limit, values).value + 1 > int(limit["max_value"]):
                return int(rls_pb2.RateLimitResponse.OVER_LIMIT)
        return int(rls_pb2.RateLimitResponse.OK)

    # ------------------------------------------------------------------ servers

    def start(self) -> LimitadorEmulator:
        ready = threading.Event()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._main(ready)), name="limitador-emulator", daemon=True
        )
        self._thread.start()
        if not ready.wait(10):
            raise TimeoutError("limitador emulator did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(10)
        self._thread = None

    def __enter__(self) -> LimitadorEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        service.add_servicer_to_server(_Servicer(self), server)
        self.grpc_port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        app = web.Application()
        app.router.add_get("/limits/{namespace:.+}", self._http_limits)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.http_port = runner.addresses[0][1]
        ready.set()
        try:
            await self._stopped.wait()
        finally:
            await server.stop(0)
            await runner.cleanup()

    async def _http_limits(self, request: web.Request) -> web.Response:
        namespace = urllib.parse.unquote(request.match_info["namespace"])
        with self._lock:
            found = [limit for limit in self.limits if limit["namespace"] == namespace]
        return web.json_response(found)


class _Servicer(service.RateLimitServiceServicer):  # type: ignore[misc]
    def __init__(self, emulator: LimitadorEmulator) -> None:
        self._emulator = emulator

    async def _guard(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if self._emulator._failing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "storage unavailable")

    async def CheckRateLimit(  # noqa: N802 - the generated servicer's name
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        await self._guard(context)
        with self._emulator._lock:
            code = self._emulator.check(request)
        return rls_pb2.RateLimitResponse(overall_code=code)

    async def Report(  # noqa: N802 - the generated servicer's name
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        await self._guard(context)
        with self._emulator._lock:
            self._emulator.report(request)
        return rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)
