"""A local Limitador: Kuadrant's RateLimitService (CheckRateLimit, Report) and ``GET /limits/<ns>``.

Written from Limitador's own format, never from the sidecar's parsers, so the two can disagree.
Limits have Limitador's JSON shape (``id, namespace, max_value, seconds, name, conditions,
variables``: Kuadrant/limitador ``limitador-server/src/http_api/request_types.rs`` at 2981b2bd).
Since Limitador 2 a condition is a CEL predicate and a variable a CEL expression over
``descriptors``, the request's descriptors as a list of maps (``limitador/src/limit/cel.rs``,
``limitador-server/src/envoy_rls/server.rs``). This emulator evaluates the part of CEL those
limits use: a descriptor entry read as ``descriptors[i]["k"]``, ``descriptors[i]['k']`` or
``descriptors[i].k``, compared with ``==`` or ``!=`` to a string literal. A limit written with any
other CEL is refused when set, so a test never relies on an emulator that guesses.

Semantics (``limitador/src/limit.rs``, ``lib.rs``): a limit applies when every condition is true
(an entry that is not there makes it false); it is counted only when every variable resolves; a
counter per (limit, variable values) in a fixed window that starts at its first hit; ``Report``
adds ``hits_addend`` unconditionally (0 counts as 1); ``CheckRateLimit`` adds nothing and answers
OVER_LIMIT when counter + 1 > max (``kuadrant_service.rs``: ``is_rate_limited(.., 1)``). An empty
domain answers UNKNOWN. It runs on its own thread and loop, so synchronous tests and other
processes can both reach it; ``fail(True)`` makes both RPCs answer UNAVAILABLE, as Limitador
does when its storage fails.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from envoy.service.ratelimit.v3 import rls_pb2

# The stubs generated from our declaration of Kuadrant's service (protos/): the wire, no parser.
from extproc._gen.kuadrant.service.ratelimit.v1 import ratelimit_pb2_grpc

Json = dict[str, Any]
Descriptors = Sequence[dict[str, str]]

# CEL, the small part Kuadrant's limits use (https://github.com/google/cel-spec, langdef.md).
_STRING = r"""(?:"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')"""
_ACCESS = re.compile(
    rf"""^descriptors\s*\[\s*(\d+)\s*\](?:\s*\[\s*({_STRING})\s*\]|\.([A-Za-z_][A-Za-z0-9_]*))$"""
)
_TOKEN = re.compile(rf"{_STRING}|==|!=|[^\"'=!]+|[=!]")
_LITERAL = re.compile(rf"^{_STRING}$")


def _unquote(literal: str) -> str:
    return re.sub(r"\\(.)", r"\1", literal[1:-1])


@dataclass(frozen=True)
class Access:
    """``descriptors[index][key]``: the entry's value, or None when it is not there."""

    index: int
    key: str

    @classmethod
    def parse(cls, text: str) -> Access:
        match = _ACCESS.match(text.strip())
        if match is None:
            raise ValueError(f"not a descriptor entry the emulator evaluates: {text!r}")
        return cls(int(match[1]), _unquote(match[2]) if match[2] else match[3])

    def resolve(self, descriptors: Descriptors) -> str | None:
        if self.index >= len(descriptors):
            return None
        return descriptors[self.index].get(self.key)


@dataclass(frozen=True)
class Condition:
    """``<entry> == "<v>"`` or ``!=``, either side first; false when the entry is not there."""

    access: Access
    equal: bool
    value: str

    @classmethod
    def parse(cls, text: str) -> Condition:
        tokens = _TOKEN.findall(text)
        ops = [i for i, token in enumerate(tokens) if token in ("==", "!=")]
        if "".join(tokens) != text or len(ops) != 1:
            raise ValueError(f"not one comparison the emulator evaluates: {text!r}")
        left = "".join(tokens[: ops[0]]).strip()
        op = tokens[ops[0]]
        right = "".join(tokens[ops[0] + 1 :]).strip()
        if _LITERAL.match(left):
            left, right = right, left
        if not _LITERAL.match(right):
            raise ValueError(f"not a comparison with a string literal: {text!r}")
        return cls(Access.parse(left), op == "==", _unquote(right))

    def holds(self, descriptors: Descriptors) -> bool:
        found = self.access.resolve(descriptors)
        return found is not None and (found == self.value) == self.equal


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


@dataclass(frozen=True)
class Limit:
    """A limit as set, parsed once. Its identity (Limitador hashes namespace, seconds, conditions
    and variables, not max_value) keys its counters, so replacing the limits keeps them."""

    raw: Json
    conditions: tuple[Condition, ...]
    variables: tuple[Access, ...]

    @classmethod
    def parse(cls, raw: Json) -> Limit:
        return cls(
            dict(raw),
            tuple(Condition.parse(c) for c in raw.get("conditions") or ()),
            tuple(Access.parse(v) for v in raw.get("variables") or ()),
        )

    @property
    def identity(self) -> tuple[object, ...]:
        raw = self.raw
        return (
            raw["namespace"],
            int(raw["seconds"]),
            frozenset(raw.get("conditions") or ()),
            frozenset(raw.get("variables") or ()),
        )

    def values(self, descriptors: Descriptors) -> tuple[str, ...] | None:
        """The counter's variable values when the limit applies and is counted, else None."""
        if not all(condition.holds(descriptors) for condition in self.conditions):
            return None
        values = [access.resolve(descriptors) for access in self.variables]
        if any(value is None for value in values):
            return None  # a variable that does not resolve: no counter (Counter::new -> None)
        return tuple(value for value in values if value is not None)

    def as_listed(self) -> Json:
        """``GET /limits/<ns>``'s shape: every field, absent optional ones as null."""
        raw = self.raw
        return {
            "id": raw.get("id"),
            "namespace": raw["namespace"],
            "max_value": int(raw["max_value"]),
            "seconds": int(raw["seconds"]),
            "name": raw.get("name"),
            "conditions": list(raw.get("conditions") or ()),
            "variables": list(raw.get("variables") or ()),
        }


@dataclass
class LimitadorEmulator:
    clock: Callable[[], float] = time.monotonic
    limits: list[Limit] = field(default_factory=list)
    windows: dict[tuple[tuple[object, ...], tuple[str, ...]], Window] = field(default_factory=dict)
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
        """Replace the limits (Limitador's JSON shape); counters are kept, as Limitador does.
        A condition or variable outside the CEL this emulator evaluates raises ValueError."""
        parsed = [Limit.parse(limit) for limit in limits]
        with self._lock:
            self.limits = parsed

    def fail(self, failing: bool) -> None:
        """True: every RPC answers UNAVAILABLE (storage down); False: serve again."""
        with self._lock:
            self._failing = failing

    def counter(self, namespace: str, name: str, *values: str) -> int:
        """The live value of limit ``name``'s counter for these variable values (0 when none)."""
        with self._lock:
            now = self.clock()
            for limit in self.limits:
                if limit.raw["namespace"] == namespace and limit.raw.get("name") == name:
                    window = self.windows.get((limit.identity, values))
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

    def _counted(self, request: Any) -> list[tuple[Limit, Window]]:
        """The window of each limit of the domain that applies to the request and is counted."""
        descriptors = [{e.key: e.value for e in d.entries} for d in request.descriptors]
        found = []
        for limit in self.limits:
            if limit.raw["namespace"] != request.domain:
                continue
            values = limit.values(descriptors)
            if values is not None:
                found.append((limit, self._window(limit, values)))
        return found

    def _window(self, limit: Limit, values: tuple[str, ...]) -> Window:
        now = self.clock()
        key = (limit.identity, values)
        window = self.windows.get(key)
        if window is None or window.expires_at <= now:  # fixed window from the first hit
            window = self.windows[key] = Window(0, now + float(limit.raw["seconds"]))
        return window

    def report(self, request: Any) -> int:
        if not request.domain:
            return int(rls_pb2.RateLimitResponse.UNKNOWN)
        hits = request.hits_addend or 1
        labels: tuple[tuple[str, str], ...] = ()
        if len(request.descriptors) > 1:
            labels = tuple((e.key, e.value) for e in request.descriptors[1].entries)
        counters: tuple[tuple[str, str], ...] = ()
        if request.descriptors:
            counters = tuple((e.key, e.value) for e in request.descriptors[0].entries)
        self.reports.append(Received(request.domain, counters, labels, hits))
        for _limit, window in self._counted(request):
            window.value += hits
        return int(rls_pb2.RateLimitResponse.OK)

    def check(self, request: Any) -> int:
        if not request.domain:
            return int(rls_pb2.RateLimitResponse.UNKNOWN)
        self.checks += 1
        for limit, window in self._counted(request):
            if window.value + 1 > int(limit.raw["max_value"]):
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
        ratelimit_pb2_grpc.add_RateLimitServiceServicer_to_server(_Servicer(self), server)
        self.grpc_port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        app = web.Application()
        # One path segment: a namespace with "/" arrives percent-encoded, as Limitador's
        # actix route /limits/{namespace} takes it (limitador-server src/http_api/server.rs).
        app.router.add_get("/limits/{namespace}", self._http_limits)
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
        namespace = request.match_info["namespace"]  # decoded once, as actix's Path<String>
        with self._lock:
            found = [
                limit.as_listed() for limit in self.limits if limit.raw["namespace"] == namespace
            ]
        return web.json_response(found)


class _Servicer(ratelimit_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
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
            code = self._emulator.report(request)
        return rls_pb2.RateLimitResponse(overall_code=code)
