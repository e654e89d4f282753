"""The CounterStore over Redis (standalone, Cluster or Sentinel): one Lua script call per admit and settle."""

from __future__ import annotations

import asyncio
import calendar
import datetime as dt
import functools
import hashlib
import logging
import re
import time
import urllib.parse
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar, cast

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from extproc.config import ExportStreamConfig, StoreConfig, redact_url
from extproc.errors import StoreUnavailable
from extproc.limits import windows
from extproc.store import keys, ledger
from extproc.store.base import (
    Adjustment,
    AdmitResult,
    CounterState,
    Hold,
    LedgerEntry,
    LedgerRow,
    WindowCounter,
)
from extproc.store.bulk import BulkReader
from extproc.store.pipelined import PipelinedConnection, Target

log = logging.getLogger("extproc.store.redis")

_DAY_MS = 86_400_000
_KNOWN_DAYS = 3  # days of the users-set cache kept in memory (today, yesterday, a late spool)

Client = Redis | RedisCluster


@dataclass(frozen=True, slots=True)
class _Script:
    name: str
    source: str
    sha: str

    @classmethod
    def load(cls, name: str) -> _Script:
        """The script with the shared window functions (windows.lua) in front of it."""
        folder = resources.files("extproc.store").joinpath("lua")
        source = (
            folder.joinpath("windows.lua").read_text() + folder.joinpath(f"{name}.lua").read_text()
        )
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())


class RedisStore:
    """Window counters and the usage ledger in Redis; every key of one user shares a hash slot."""

    def __init__(
        self,
        client: Client,
        url: str = "",
        retention_days: int = 90,
        helpers: Sequence[Redis] = (),
        dedupe_ttl_ms: int = 3_600_000,
        hot: PipelinedConnection | None = None,
        bulk: BulkReader | None = None,
        export: ExportStreamConfig | None = None,
    ) -> None:
        self._client = client
        # Charge records go to the export stream inside the settle script (settle.lua's end).
        self._export = export or ExportStreamConfig(enabled=False)
        self._cluster = isinstance(client, RedisCluster)
        self._known_streams: set[str] = set()  # Cluster: slot streams registered by this process
        # admit and settle go through the pipelined connection when the URL allows one.
        self._hot = hot
        # The listings' batches of reads: a socket of their own, so they never queue before
        # (or behind) the hot path's commands.
        self._bulk = bulk
        self._since: str | None = None  # see _totals_since
        self._since_read = float("-inf")
        self._helpers = tuple(helpers)  # e.g. the Sentinel connections, closed with the store
        self._where = redact_url(url) if url else type(client).__name__
        self._secrets = _secrets(url)
        self._retention_ms = retention_days * _DAY_MS
        self._dedupe_ttl_ms = dedupe_ttl_ms
        self._cluster = isinstance(client, RedisCluster)
        self._admit = _Script.load("admit")
        self._settle = _Script.load("settle")
        # (day -> users) already added to the day's users set by this process; see _remember_user.
        self._known_users: dict[str, set[str]] = {}

    @property
    def client(self) -> Client:
        return self._client

    @property
    def export(self) -> ExportStreamConfig:
        return self._export

    @property
    def cluster(self) -> bool:
        return self._cluster

    @classmethod
    def from_config(
        cls, config: StoreConfig, export: ExportStreamConfig | None = None
    ) -> RedisStore:
        """A store for ``config.url``: redis://, rediss://, redis[s]+cluster://, redis+sentinel://."""
        url = str(config.url)
        try:
            client, helpers = connect(url, config.timeout_s)
        except (ValueError, RedisError) as exc:
            detail = _scrub(str(exc), _secrets(url))
            raise StoreUnavailable(
                f"cannot configure redis at {redact_url(url)}: {detail}"
            ) from None
        target = Target.from_url(url)
        hot = PipelinedConnection(target, config.timeout_s or None) if target else None
        bulk = BulkReader(target, config.timeout_s or None) if target else None
        return cls(
            client,
            url,
            config.retention_days,
            helpers,
            config.dedupe_ttl_s * 1000,
            hot,
            bulk,
            export,
        )

    def __repr__(self) -> str:
        return f"RedisStore({self._where!r})"

    async def start(self) -> None:
        """Load both scripts now so the first request does not pay for it (EVALSHA reloads anyway)."""
        for script in (self._admit, self._settle):
            await self._call("start", self._client.script_load(script.source))
        # This version writes every ledger hash's totals (store/ledger.py); today's hashes may
        # hold amounts an older version wrote without them, so listings trust them from tomorrow.
        tomorrow = ledger.day_of(int(time.time() * 1000) + _DAY_MS)
        await self._call(
            "start", self._client.set(keys.ledger_totals_since_key(), tomorrow, nx=True)
        )
        if self._cluster and self._export.enabled:
            keys.export_stream_key(self._export.key, "", cluster=True)  # solve the slot tags now

    async def admit(
        self,
        counters: Sequence[WindowCounter],
        now_ms: int,
        hold: Hold | None = None,
        *,
        request_id: str = "",
    ) -> AdmitResult:
        if not counters and hold is None:
            return AdmitResult(True, ())
        if self._cluster:  # the user's slot matters on Cluster only
            main_tag = keys.hash_tag(keys.ledger_key(hold.userid, hold.day)) if hold else ""
            if _spans_slots(main_tag, (c.key for c in counters)):
                return await self._admit_split(counters, now_ms, hold, request_id, main_tag)
        state_key = keys.request_key(hold.userid, request_id) if request_id and hold else ""
        return await self._admit_one(counters, now_ms, hold, state_key)

    async def _admit_one(
        self, counters: Sequence[WindowCounter], now_ms: int, hold: Hold | None, state_key: str
    ) -> AdmitResult:
        """admit.lua on one slot: the counters, the hold and the request's state."""
        script_keys: list[str] = []
        args: list[int | str] = [now_ms, len(counters)]
        for counter in counters:
            start = end = mode = 0
            if counter.period_end_ms:
                mode, start, end = 2, counter.period_start_ms, counter.period_end_ms
                script_keys.append(counter.key)
            elif counter.sliding:
                bucket = windows.bucket_of(now_ms, counter.window_ms)
                mode, start = 1, bucket * counter.window_ms
                script_keys.append(keys.sliding_bucket_key(counter.key, bucket))
                script_keys.append(keys.sliding_bucket_key(counter.key, bucket - 1))
            else:
                script_keys.append(counter.key)
            args += [counter.limit, counter.window_ms, counter.hits, mode, start, end]
            args.append(int(counter.enforce))
        if hold is None:
            args += [0, 0]
        else:
            ttl_ms = self._ledger_ttl_ms(hold.day, now_ms)
            if not self._remembered(hold.userid, hold.day):  # no coroutine when it is known
                await self._remember_user(hold.userid, hold.day, ttl_ms, "admit")
            script_keys.append(keys.ledger_key(hold.userid, hold.day))
            args += _ledger_part(ttl_ms, ledger.hold_fields(hold, 1))
        if state_key:
            script_keys.append(state_key)
            args.append(self._dedupe_ttl_ms)
        else:
            args.append(0)
        reply = await self._eval("admit", self._admit, script_keys, args)
        states = tuple(
            CounterState(int(reply[i]), int(reply[i + 1]), int(reply[i + 2]))
            for i in range(2, len(reply), 3)
        )
        return AdmitResult(reply[0] == 1, states, int(reply[1]))

    async def _admit_split(
        self,
        counters: Sequence[WindowCounter],
        now_ms: int,
        hold: Hold | None,
        request_id: str,
        main_tag: str,
    ) -> AdmitResult:
        """Redis Cluster, counters on several slots: one admit.lua per slot, all at once.

        Each slot's script is atomic on its own, with its own request state (so a late
        admission after the settle is void there too). When one slot refuses, or fails, the
        reservations the others took are given back (``_give_back``); until then they hold
        room that another request may be refused for (README "Budgets on Redis Cluster").
        """
        slots = _by_slot(counters, main_tag)
        calls = []
        for tag, indexes in slots.items():
            part = [counters[i] for i in indexes]
            if tag == main_tag and hold is not None:
                state_key = keys.request_key(hold.userid, request_id) if request_id else ""
                calls.append(self._admit_one(part, now_ms, hold, state_key))
            else:
                state_key = keys.tagged_request_key(tag, request_id) if request_id else ""
                calls.append(self._admit_one(part, now_ms, None, state_key))
        results = await asyncio.gather(*calls, return_exceptions=True)
        states = [CounterState(0, now_ms, 0)] * len(counters)
        denied = -1
        for indexes, result in zip(slots.values(), results, strict=True):
            if isinstance(result, AdmitResult):
                for index, state in zip(indexes, result.states, strict=False):
                    states[index] = state
                if not result.allowed:
                    first = indexes[result.denied_index]
                    denied = first if denied < 0 else min(denied, first)
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is None and denied < 0:
            return AdmitResult(True, tuple(states))
        await self._give_back(slots, results, counters, now_ms, hold, request_id, main_tag)
        if failure is not None:
            if isinstance(failure, StoreUnavailable):
                raise failure
            raise self._unavailable("admit", failure)
        return AdmitResult(False, tuple(states), denied)

    async def _give_back(
        self,
        slots: dict[str, list[int]],
        results: Sequence[AdmitResult | BaseException],
        counters: Sequence[WindowCounter],
        now_ms: int,
        hold: Hold | None,
        request_id: str,
        main_tag: str,
    ) -> None:
        """Release what the slots that admitted reserved: their settle with nothing used."""
        calls = []
        for (tag, indexes), result in zip(slots.items(), results, strict=True):
            if not isinstance(result, AdmitResult) or not result.allowed:
                continue
            adjustments = [
                _unreserve(counters[i], state)
                for i, state in zip(indexes, result.states, strict=True)
            ]
            main = tag == main_tag and hold is not None
            owner = hold.userid if hold is not None else ""
            state_key = ""
            if request_id:
                state_key = (
                    keys.request_key(owner, request_id)
                    if main
                    else keys.tagged_request_key(tag, request_id)
                )
            release = hold if main else None
            calls.append(self._settle_one(adjustments, None, now_ms, state_key, release))
        for outcome in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(outcome, BaseException):
                # The reservation stays until its window or period ends: logged, never raised.
                log.warning("redis give-back failed store=%s error=%s", self._where, outcome)

    async def claim(self, key: str, ttl_ms: int, now_ms: int) -> bool:
        reply = self._client.set(key, "1", nx=True, px=max(1, ttl_ms))
        return bool(await self._call("claim", reply))

    async def settle(
        self,
        adjustments: Sequence[Adjustment],
        entry: LedgerEntry | None,
        now_ms: int,
        *,
        request_id: str = "",
        release: Hold | None = None,
        record: str = "",
    ) -> bool:
        if not adjustments and entry is None and release is None:
            return True
        owner = entry or release
        state_key = keys.request_key(owner.userid, request_id) if request_id and owner else ""
        main_tag = ""
        if self._cluster:  # the user's slot matters on Cluster only
            main_tag = keys.hash_tag(keys.ledger_key(owner.userid, "")) if owner else ""
        if self._cluster and _spans_slots(main_tag, (a.key for a in adjustments)):
            slots = _by_slot(adjustments, main_tag)
            calls = []
            for tag, indexes in slots.items():
                part = [adjustments[i] for i in indexes]
                if tag == main_tag:
                    calls.append(self._settle_one(part, entry, now_ms, state_key, release, record))
                else:
                    side = keys.tagged_request_key(tag, request_id) if request_id else ""
                    calls.append(self._settle_one(part, None, now_ms, side, None))
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    # Replayed whole from the spool: each slot applies its part at most once.
                    raise outcome
            return all(outcomes) if main_tag not in slots else bool(outcomes[0])
        return await self._settle_one(adjustments, entry, now_ms, state_key, release, record)

    async def _settle_one(
        self,
        adjustments: Sequence[Adjustment],
        entry: LedgerEntry | None,
        now_ms: int,
        state_key: str,
        release: Hold | None,
        record: str = "",
    ) -> bool:
        """settle.lua on one slot; ``state_key`` "" applies it without the at-most-once check."""
        marker_ttl = self._dedupe_ttl_ms if state_key else 0
        script_keys: list[str] = []
        args: list[int | str] = [now_ms, len(adjustments), marker_ttl]
        for adj in adjustments:
            current_start = 0
            reserved_start = adj.window_start_ms
            if adj.period_end_ms:
                script_keys += [adj.key, adj.current_key]
                same = int(adj.key == adj.current_key and now_ms < adj.period_end_ms)
                args += [2, adj.current_end_ms, same, 0, adj.reserved, adj.actual]
                continue
            if adj.sliding:
                reserved_bucket = adj.window_start_ms // adj.window_ms
                current_bucket = windows.bucket_of(now_ms, adj.window_ms)
                reserved_start = reserved_bucket * adj.window_ms
                current_start = current_bucket * adj.window_ms
                script_keys.append(keys.sliding_bucket_key(adj.key, reserved_bucket))
                script_keys.append(keys.sliding_bucket_key(adj.key, current_bucket))
            else:
                script_keys.append(adj.key)
            args += [int(adj.sliding), adj.window_ms, reserved_start, current_start]
            args += [adj.reserved, adj.actual]
        if entry is None:
            args += [0, 0]
        else:
            ttl_ms = self._ledger_ttl_ms(entry.day, now_ms)
            if not self._remembered(entry.userid, entry.day):
                await self._remember_user(entry.userid, entry.day, ttl_ms, "settle")
            script_keys.append(keys.ledger_key(entry.userid, entry.day))
            args += _ledger_part(ttl_ms, ledger.entry_fields(entry))
        if release is None:
            args += [0, 0]
        else:
            script_keys.append(keys.ledger_key(release.userid, release.day))
            ttl_ms = self._ledger_ttl_ms(release.day, now_ms)
            args += _ledger_part(ttl_ms, ledger.hold_fields(release, -1))
        # KEYS[1] is the request's state; without an id, any key of the slot holds its place.
        script_keys.insert(0, state_key or script_keys[0])
        # The export part comes last in KEYS and ARGV (settle.lua reads it from the end); only
        # the user's slot (the one with the ledger entry) carries the record.
        if record and entry is not None and self._export.enabled:
            stream = keys.export_stream_key(self._export.key, entry.userid, cluster=self._cluster)
            if self._cluster:
                await self._register_stream(stream)
            script_keys.append(stream)
            args += [self._export.maxlen, record]
        else:
            args += [0, ""]
        reply = await self._eval("settle", self._settle, script_keys, args)
        return int(cast(int, reply)) >= 0

    async def ledger(self, userid: str, days: Sequence[str]) -> list[LedgerRow]:
        # One user's days share a slot, so even on Cluster this pipeline is one round trip.
        return (await self.ledgers([userid], days))[0]

    async def ledgers(self, userids: Sequence[str], days: Sequence[str]) -> list[list[LedgerRow]]:
        if not days or not userids:
            return [[] for _ in userids]
        # On Cluster the pipeline asks each node once for the keys it holds.
        commands = [("HGETALL", keys.ledger_key(u, day)) for u in userids for day in days]
        replies = iter(await self._read_many(commands))
        found: list[list[LedgerRow]] = []
        for _ in userids:
            rows: list[LedgerRow] = []
            for day, fields in zip(days, replies, strict=False):
                if fields:
                    rows.extend(ledger.rows(day, _hash(fields)))
            found.append(rows)
        return found

    async def ledger_totals(
        self, userids: Sequence[str], days: Sequence[str]
    ) -> list[list[LedgerRow]]:
        since = await self._totals_since()
        summed = [day for day in days if since is not None and day >= since]
        # Days before the totals: their hashes in full (they may hold amounts without totals).
        found = await self.ledgers(userids, [day for day in days if day not in summed])
        if summed:
            commands = [
                ("HMGET", keys.ledger_key(userid, day), *ledger.TOTAL_FIELDS)
                for userid in userids
                for day in summed
            ]
            replies = await self._read_many(commands)
            width = len(summed)
            for at, rows in enumerate(found):
                row = ledger.totals(replies[at * width : (at + 1) * width])
                if row is not None:
                    rows.append(row)
        return found

    async def _totals_since(self) -> str | None:
        """The first day whose hashes carry their totals (None: no such day), read at most
        every few seconds: a listing asks for it once a batch."""
        now = time.monotonic()
        if now - self._since_read > _SINCE_TTL_S:
            since = await self._call("ledger", self._client.get(keys.ledger_totals_since_key()))
            self._since = str(since) if since is not None and _DAY.fullmatch(str(since)) else None
            self._since_read = now
        return self._since

    async def _read_many(self, commands: Sequence[tuple[str, ...]]) -> list[Any]:
        """Replies to many read commands: pipelined on the bulk socket, else through redis-py."""
        if self._bulk is not None:
            return cast(list[Any], await self._call("ledger", self._bulk.read(commands)))
        pipe = self._client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return cast(list[Any], await self._call("ledger", pipe.execute()))

    async def ledger_users(self, days: Sequence[str]) -> list[str]:
        if not days:
            return []
        # A day's set can hold every user: read in chunks (SSCAN), so that no single reply holds
        # the event loop (the usage API shares it with the gRPC services).
        users: set[str] = set()
        for day in days:
            cursor = 0
            while True:
                reading = self._client.sscan(keys.ledger_users_key(day), cursor, count=_USERS_CHUNK)
                cursor, members = await self._call("ledger_users", reading)
                users.update(str(m) for m in members)
                if not cursor:
                    break
        return sorted(users)

    async def ping(self) -> None:
        await self._call("ping", self._client.ping())

    async def close(self) -> None:
        if self._hot is not None:
            await self._hot.close()
        if self._bulk is not None:
            await self._bulk.close()
        for client in (self._client, *self._helpers):
            try:
                await client.aclose()
            except _FAILURES as exc:
                log.debug("redis close failed store=%s error=%s", self._where, type(exc).__name__)

    def _ledger_ttl_ms(self, day: str, now_ms: int) -> int:
        """Keep a day while the memory store would: until ``retention_days`` after the day ends.

        A relative TTL (not PEXPIREAT) because ``now_ms`` is the caller's clock, not the server's.
        """
        day_start_ms = _day_start_ms(day)
        return max(1, day_start_ms + _DAY_MS + self._retention_ms - now_ms)

    def _remembered(self, userid: str, day: str) -> bool:
        """Whether this process has added the user to the day's users set already."""
        known = self._known_users.get(day)
        return known is not None and userid in known

    async def _remember_user(self, userid: str, day: str, ttl_ms: int, op: str) -> None:
        """Add the user to the day's users set, once per (user, day) per process.

        The set is not user-tagged, so on Cluster it cannot join the settle script. Doing it only
        on this process's first ledger write of (user, day) keeps the hot path at one round trip;
        that first settle pays one extra (SADD + PEXPIRE, pipelined). It runs before the script, so
        if it fails nothing was charged yet and a replay of the whole settle is safe. The cache is
        dropped whenever Redis fails, since a restarted Redis may have lost the set.
        """
        known = self._known_users.get(day)
        if known is not None and userid in known:
            return
        users_key = keys.ledger_users_key(day)
        pipe = self._client.pipeline(transaction=False)
        pipe.sadd(users_key, userid)
        pipe.pexpire(users_key, ttl_ms)
        await self._call(op, pipe.execute())
        if known is None:
            known = self._known_users[day] = set()
            for old in sorted(self._known_users)[:-_KNOWN_DAYS]:
                del self._known_users[old]
        known.add(userid)

    async def _register_stream(self, stream: str) -> None:
        """Cluster: add a slot's stream to the set ``export`` reads, once per process.

        As ``_remember_user``: it runs before the script, so a failure charges nothing yet."""
        if stream in self._known_streams:
            return
        await self._call("settle", self._client.sadd(keys.EXPORT_STREAMS_KEY, stream))
        self._known_streams.add(stream)

    async def _eval(
        self, op: str, script: _Script, script_keys: list[str], args: Sequence[int | str]
    ) -> list[Any]:
        """EVALSHA; on NOSCRIPT (a restarted or flushed server) load the script and retry once."""
        try:
            reply = await self._evalsha(script, script_keys, args)
        except NoScriptError:
            log.info("redis script reloaded script=%s store=%s", script.name, self._where)
            load = ("SCRIPT", "LOAD", script.source)
            reloading = (
                self._hot.execute(*load) if self._hot else self._client.script_load(script.source)
            )
            await self._call(op, reloading)
            reply = await self._call(op, self._evalsha(script, script_keys, args))
        except _FAILURES as exc:
            raise self._unavailable(op, exc) from None
        return cast(list[Any], reply)

    def _evalsha(
        self, script: _Script, script_keys: list[str], args: Sequence[int | str]
    ) -> Awaitable[Any]:
        if self._hot is not None:
            return self._hot.execute("EVALSHA", script.sha, len(script_keys), *script_keys, *args)
        return self._client.evalsha(script.sha, len(script_keys), *script_keys, *args)

    async def _call(self, op: str, pending: Any) -> Any:
        """Await one Redis call; every failure becomes ``StoreUnavailable``."""
        try:
            return await pending
        except _FAILURES as exc:
            raise self._unavailable(op, exc) from None

    def _unavailable(self, op: str, exc: BaseException) -> StoreUnavailable:
        """The error to raise, its message redacted; the cause is left off so it cannot leak."""
        self._known_users.clear()
        self._known_streams.clear()
        detail = _scrub(str(exc), self._secrets)
        return StoreUnavailable(
            f"redis {op} failed at {self._where}: {type(exc).__name__}: {detail}"
        )


_FAILURES = (RedisError, OSError, TimeoutError)

_Keyed = TypeVar("_Keyed", WindowCounter, Adjustment)


def _spans_slots(main_tag: str, counter_keys: Iterable[str]) -> bool:
    """Whether some key lies outside the user's slot (Redis Cluster then needs one call per slot)."""
    return any(keys.hash_tag(key) != main_tag for key in counter_keys)


def _by_slot(items: Sequence[_Keyed], main_tag: str) -> dict[str, list[int]]:
    """Indexes of ``items`` per hash tag, the user's tag first (it holds the hold and the entry)."""
    slots: dict[str, list[int]] = {main_tag: []} if main_tag else {}
    for index, item in enumerate(items):
        slots.setdefault(keys.hash_tag(item.key), []).append(index)
    return slots


def _unreserve(counter: WindowCounter, state: CounterState) -> Adjustment:
    """The adjustment that gives back what ``counter`` reserved (nothing was used)."""
    return Adjustment(
        key=counter.key,
        window_ms=counter.window_ms,
        window_start_ms=state.window_start_ms,
        reserved=counter.hits,
        actual=0,
        sliding=counter.sliding,
        period_end_ms=counter.period_end_ms,
        current_key=counter.key,
        current_end_ms=counter.period_end_ms,
    )


def _hash(reply: dict[str, str] | list[bytes]) -> dict[str, int]:
    """An HGETALL reply as field -> amount: a dict from redis-py, a flat list of bytes from the
    bulk socket (RESP2)."""
    if isinstance(reply, dict):
        return {str(k): int(v) for k, v in reply.items()}
    return {_field(reply[i]): int(reply[i + 1]) for i in range(0, len(reply), 2)}


@functools.lru_cache(maxsize=4096)
def _field(name: bytes) -> str:
    return name.decode()


_DAY = re.compile(r"[0-9]{8}")
_SINCE_TTL_S = 5.0
_USERS_CHUNK = 5000


@functools.lru_cache(maxsize=8)
def _day_start_ms(day: str) -> int:
    """Midnight UTC of ``YYYYMMDD``, in ms; strptime costs about 30 µs, and few days are in use."""
    return calendar.timegm(dt.datetime.strptime(day, "%Y%m%d").timetuple()) * 1000


def _ledger_part(ttl_ms: int, pairs: Sequence[tuple[str, int]]) -> list[int | str]:
    """One ledger part of a script's ARGV: ttl, number of pairs, then field, amount pairs."""
    out: list[int | str] = [ttl_ms, len(pairs)]
    for field, amount in pairs:
        out += [field, amount]
    return out


def connect(url: str, timeout_s: float) -> tuple[Client, list[Redis]]:
    """A client for ``url`` (any scheme ``config`` accepts), and helper clients to close with it.

    The helpers are Sentinel's own connections; ``timeout_s`` 0 means no timeout.
    """
    scheme, _, rest = url.partition("://")
    timeout = timeout_s or None
    # One quick retry, on a fresh connection, and only for connection errors: it heals a pooled
    # socket that died with a restarted server without risking a double charge after a timeout.
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "decode_responses": True,
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    }
    if scheme in ("redis", "rediss"):
        return Redis.from_url(url, **common), []
    userinfo, hosts, path, query = _split(rest)
    tls = scheme.startswith("rediss")
    # Reuse redis-py's parsing of credentials and query options on a one-host URL.
    first_host = f"[{hosts[0][0]}]" if ":" in hosts[0][0] else hosts[0][0]
    single = f"{'rediss' if tls else 'redis'}://{userinfo}{first_host}:{hosts[0][1]}{query}"
    options: dict[str, Any] = dict(parse_url(single))
    for name in ("host", "port", "connection_class"):
        options.pop(name, None)
    options.update(common)
    if scheme in ("redis+cluster", "rediss+cluster"):
        nodes = [ClusterNode(host, port) for host, port in hosts]
        return RedisCluster(startup_nodes=nodes, ssl=tls, **options), []
    if scheme == "redis+sentinel":
        service, _, db = path.strip("/").partition("/")
        if not service:
            raise ValueError("redis+sentinel:// needs /service_name")
        sentinel_options = {name: options[name] for name in common if name != "decode_responses"}
        sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_options, **options)  # type: ignore[no-untyped-call]
        master = cast(Redis, sentinel.master_for(service, db=int(db or 0)))
        return master, list(sentinel.sentinels)
    raise ValueError(f"unsupported store URL scheme {scheme!r}")


def _split(rest: str) -> tuple[str, list[tuple[str, int]], str, str]:
    """``user:pass@h1:p1,h2:p2/path?query`` -> ('user:pass@', [(h1, p1), (h2, p2)], '/path', '?query')."""
    netloc, _, tail = rest.partition("/")
    path, _, query = ("/" + tail if tail or rest.endswith("/") else "").partition("?")
    if "?" in netloc:
        netloc, _, query = netloc.partition("?")
    userinfo, at, hostlist = netloc.rpartition("@")
    hosts: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        host, port = _host_port(item)
        hosts.append((host, port))
    if not hosts or not hosts[0][0]:
        raise ValueError("store URL needs at least one host")
    return userinfo + at, hosts, path, "?" + query if query else ""


def _host_port(item: str) -> tuple[str, int]:
    if item.startswith("["):  # [ipv6]:port
        host, _, port = item[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
    return host, int(port) if port else 6379


def _secrets(url: str) -> tuple[str, ...]:
    """The URL's password, raw and percent-decoded, to scrub from error texts."""
    netloc = url.partition("://")[2].partition("/")[0]
    userinfo, at, _ = netloc.rpartition("@")
    password = userinfo.partition(":")[2] if at else ""
    if not password:
        return ()
    return tuple({password, urllib.parse.unquote(password)})


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
