"""The export stream read through a consumer group: Redis Streams, or their in-memory equal.

``RecordStream`` is the seam: ``RedisRecords`` speaks XGROUP / XREADGROUP / XAUTOCLAIM / XACK
to Redis (one stream standalone, one per hash slot on Cluster), ``MemoryRecords`` keeps the same
semantics in process for ``memory://`` (tests, the demo). ``GroupReader`` is the one reading loop
the ``export`` command and the CloudEvents pusher share: this consumer's pending entries first
(what it read and did not acknowledge before a crash), then entries another consumer left
pending for ``claim_idle_ms``, then new ones. Delivery is at least once: an entry is acknowledged
only after its caller has done its work, so a crash in between delivers it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisError, ResponseError

from extproc.errors import StoreUnavailable
from extproc.store import keys

NEW = ">"  # XREADGROUP: entries never delivered to the group
RECORD_FIELD = "r"  # the stream entry's one field: the record's JSON (settle.lua writes it)


class NoGroup(StoreUnavailable):
    """The stream lost the group (Redis restarted without persistence, or was flushed)."""

    def __init__(self, stream: str) -> None:
        super().__init__(f"NOGROUP: the export stream {stream!r} has no such consumer group")
        self.stream = stream


@dataclass(frozen=True, slots=True)
class Entry:
    stream: str
    id: str
    record: str | None  # None: the entry is gone (trimmed past MAXLEN) or has no record field


class RecordStream(Protocol):
    async def streams(self) -> list[str]:
        """The stream keys to read (one standalone; every slot's in use on Cluster)."""
        ...

    async def ensure_group(self, stream: str, group: str, start: str) -> bool:
        """Create ``group`` at ``start`` (``0`` or ``$``) unless it exists; True if created."""
        ...

    async def rewind(self, stream: str, group: str) -> None:
        """Move ``group`` on ``stream`` back to its first entry (XGROUP SETID 0)."""
        ...

    async def trimmed_unread(self, stream: str, group: str) -> int:
        """Records trimmed (``MAXLEN``) before ``group`` read them: a reader that lagged past
        the stream's retention (0 when none, or when it cannot tell)."""
        ...

    async def read(
        self, stream: str, group: str, consumer: str, after: str, count: int, block_ms: int
    ) -> list[Entry]:
        """``after`` NEW: undelivered entries (waiting up to ``block_ms``, 0: no wait); an id:
        this consumer's pending entries after it."""
        ...

    async def claim(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int
    ) -> list[Entry]:
        """Take over entries other consumers left pending at least ``min_idle_ms``."""
        ...

    async def ack(self, stream: str, group: str, ids: Sequence[str]) -> None: ...

    async def close(self) -> None: ...


# ------------------------------------------------------------------------------------- Redis

_FAILURES = (RedisError, OSError, TimeoutError)


class RedisRecords:
    """The export streams in Redis, read with a client of their own (blocking reads)."""

    def __init__(self, client: Redis | RedisCluster, base: str, *, cluster: bool) -> None:
        self._client = client
        self._base = base
        self._cluster = cluster

    async def streams(self) -> list[str]:
        if not self._cluster:
            return [self._base]
        members = await self._call(self._client.smembers(keys.EXPORT_STREAMS_KEY))
        return sorted(str(m) for m in members)

    async def ensure_group(self, stream: str, group: str, start: str) -> bool:
        try:
            await self._client.xgroup_create(stream, group, id=start, mkstream=True)
        except ResponseError as exc:
            if str(exc).startswith("BUSYGROUP"):
                return False
            raise StoreUnavailable(f"redis XGROUP CREATE failed: {exc}") from None
        except _FAILURES as exc:
            raise _unavailable("XGROUP CREATE", exc) from None
        return True

    async def rewind(self, stream: str, group: str) -> None:
        await self._call(self._client.xgroup_setid(stream, group, "0"))

    async def trimmed_unread(self, stream: str, group: str) -> int:
        # Redis 7: entries added minus entries the group read is what it has not read; once
        # the oldest entry kept is past what it read, all of that not kept was trimmed.
        groups = await self._call(self._client.xinfo_groups(stream), stream)
        state = next((g for g in groups if str(g.get("name")) == group), None)
        if state is None:
            return 0
        last = _id_key(str(state["last-delivered-id"]))
        read = state.get("entries-read")
        if read is None and last != (0, 0):
            return 0  # Redis cannot tell how many the group read
        info = await self._call(self._client.xinfo_stream(stream), stream)
        first, added = info.get("first-entry"), info.get("entries-added")
        if not first or added is None or _id_key(str(first[0])) <= last:
            return 0
        return max(0, int(added) - int(read or 0) - int(info.get("length", 0)))

    async def read(
        self, stream: str, group: str, consumer: str, after: str, count: int, block_ms: int
    ) -> list[Entry]:
        reply = await self._call(
            self._client.xreadgroup(
                group, consumer, {stream: after}, count=count, block=block_ms or None
            ),
            stream,
        )
        out: list[Entry] = []
        for _name, entries in _by_stream(reply):
            out += [_entry(stream, entry_id, fields) for entry_id, fields in entries]
        return out

    async def claim(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int
    ) -> list[Entry]:
        reply = await self._call(
            self._client.xautoclaim(stream, group, consumer, min_idle_ms, "0-0", count=count),
            stream,
        )
        # [next cursor, [(id, fields)...], [deleted ids]]: Redis drops the deleted ones itself.
        return [_entry(stream, entry_id, fields) for entry_id, fields in reply[1] if entry_id]

    async def ack(self, stream: str, group: str, ids: Sequence[str]) -> None:
        if ids:
            await self._call(self._client.xack(stream, group, *ids), stream)

    async def close(self) -> None:
        with contextlib.suppress(*_FAILURES):
            await self._client.aclose()

    async def _call(self, pending: Any, stream: str = "") -> Any:
        try:
            return await pending
        except ResponseError as exc:
            if stream and str(exc).startswith("NOGROUP"):
                raise NoGroup(stream) from None
            raise _unavailable("export read", exc) from None
        except _FAILURES as exc:
            raise _unavailable("export read", exc) from None


def _unavailable(op: str, exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"redis {op} failed: {type(exc).__name__}")


def _by_stream(reply: Any) -> list[tuple[str, list[Any]]]:
    """XREADGROUP's reply in RESP2 (a list of [stream, entries]) or RESP3 (a map)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return [(str(k), v[0] if v and isinstance(v[0], list) else v) for k, v in reply.items()]
    return [(str(name), entries) for name, entries in reply]


def _entry(stream: str, entry_id: Any, fields: Any) -> Entry:
    record = fields.get(RECORD_FIELD) if isinstance(fields, dict) else None
    return Entry(stream, str(entry_id), str(record) if record is not None else None)


# ------------------------------------------------------------------------------------ memory


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(slots=True)
class _Group:
    last: tuple[int, int]
    pending: dict[str, tuple[str, float]] = field(default_factory=dict)  # id -> (consumer, at)


class MemoryRecords:
    """A stream in process with Redis's group semantics, for ``memory://`` (one process only)."""

    def __init__(self, key: str = "maas:export", maxlen: int = 0) -> None:
        self._key = key
        self._maxlen = maxlen
        self._entries: OrderedDict[str, str] = OrderedDict()
        self._groups: dict[str, _Group] = {}
        self._last = (0, 0)
        self._added = asyncio.Event()

    def append(self, record: str, now_ms: int) -> str:
        """XADD: the next id after the last one (milliseconds-sequence), trimming to ``maxlen``."""
        ms = max(now_ms, self._last[0])
        self._last = (ms, self._last[1] + 1 if ms == self._last[0] else 0)
        entry_id = f"{self._last[0]}-{self._last[1]}"
        self._entries[entry_id] = record
        while self._maxlen and len(self._entries) > self._maxlen:
            self._entries.popitem(last=False)
        self._added.set()
        self._added = asyncio.Event()
        return entry_id

    def __len__(self) -> int:
        return len(self._entries)

    async def streams(self) -> list[str]:
        return [self._key]

    async def ensure_group(self, stream: str, group: str, start: str) -> bool:
        if group in self._groups:
            return False
        self._groups[group] = _Group(self._last if start == "$" else (0, 0))
        return True

    async def rewind(self, stream: str, group: str) -> None:
        if group in self._groups:
            self._groups[group].last = (0, 0)

    async def trimmed_unread(self, stream: str, group: str) -> int:
        return 0  # one process: a reader that lags behind is read again from where it is

    async def read(
        self, stream: str, group: str, consumer: str, after: str, count: int, block_ms: int
    ) -> list[Entry]:
        state = self._groups.get(group)
        if state is None:
            raise NoGroup(stream)
        if after != NEW:
            start = _id_key(after)
            ids = [
                i
                for i, (owner, _) in sorted(state.pending.items(), key=lambda p: _id_key(p[0]))
                if owner == consumer and _id_key(i) > start
            ][:count]
            return [Entry(self._key, i, self._entries.get(i)) for i in ids]
        fresh = self._fresh(state, count)
        if not fresh and block_ms:
            added = self._added
            try:
                await asyncio.wait_for(added.wait(), block_ms / 1000)
            except TimeoutError:
                return []
            fresh = self._fresh(state, count)
        now = time.monotonic()
        for entry_id, _ in fresh:
            state.pending[entry_id] = (consumer, now)
        if fresh:
            state.last = _id_key(fresh[-1][0])
        return [Entry(self._key, i, r) for i, r in fresh]

    def _fresh(self, state: _Group, count: int) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for entry_id, record in reversed(self._entries.items()):
            if _id_key(entry_id) <= state.last:
                break
            out.append((entry_id, record))
        out.reverse()
        return out[:count]

    async def claim(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int
    ) -> list[Entry]:
        state = self._groups.get(group)
        if state is None:
            return []
        now = time.monotonic()
        out: list[Entry] = []
        for entry_id in sorted(state.pending, key=_id_key):
            owner, at = state.pending[entry_id]
            if owner == consumer or (now - at) * 1000 < min_idle_ms:
                continue
            if entry_id not in self._entries:  # trimmed: XAUTOCLAIM drops it from the group
                del state.pending[entry_id]
                continue
            state.pending[entry_id] = (consumer, now)
            out.append(Entry(self._key, entry_id, self._entries[entry_id]))
            if len(out) >= count:
                break
        return out

    async def ack(self, stream: str, group: str, ids: Sequence[str]) -> None:
        state = self._groups.get(group)
        if state is not None:
            for entry_id in ids:
                state.pending.pop(entry_id, None)

    async def close(self) -> None:
        return None


# ------------------------------------------------------------------------------- the reader


class GroupReader:
    """Reads the export streams as one consumer of one group; see the module docstring.

    A new group starts at the newest record (or the oldest, ``from_start``). A stream the group
    does not have yet while it has others (Cluster: a slot's first record, seen later or while
    the reader was away) is read from its beginning, so nothing written to it is skipped.
    """

    def __init__(
        self,
        source: RecordStream,
        group: str,
        consumer: str,
        *,
        from_start: bool = False,
        claim_idle_ms: int = 60_000,
        batch: int = 100,
        refresh_s: float = 10.0,
    ) -> None:
        self._source = source
        self._group = group
        self._consumer = consumer
        self._from_start = from_start
        self._claim_idle_ms = claim_idle_ms
        self._batch = batch
        self._refresh_s = refresh_s
        self._streams: list[str] = []
        self._pending_after: dict[str, str] = {}  # stream -> cursor in our own pending entries
        self._refreshed = -1e9
        self._claimed = -1e9
        self._rounds = 0
        # Records trimmed before this group read them, found when it came back (a lag past
        # export.stream.maxlen); the caller reports them.
        self.trimmed = 0

    @property
    def streams(self) -> list[str]:
        return list(self._streams)

    async def prepare(self) -> None:
        """Find the streams and create the group on them now (``next_batch`` does it too)."""
        await self._refresh()

    async def next_batch(self, block_ms: int) -> list[Entry]:
        """The next entries to handle; [] when nothing came within ``block_ms`` (0: no wait).

        A stream that lost the group (a Redis restarted without persistence) is dropped and
        found again: the group is made anew at its first record, so nothing written since is
        skipped."""
        try:
            return await self._next_batch(block_ms)
        except NoGroup as gone:
            if gone.stream in self._streams:
                self._streams.remove(gone.stream)
            self._pending_after.pop(gone.stream, None)
            self._refreshed = -1e9
            return []

    async def _next_batch(self, block_ms: int) -> list[Entry]:
        await self._refresh()
        # 1. What this consumer was given and never acknowledged (it crashed or stopped).
        for stream, cursor in list(self._pending_after.items()):
            entries = await self._source.read(
                stream, self._group, self._consumer, cursor, self._batch, 0
            )
            if entries:
                self._pending_after[stream] = entries[-1].id
                return entries
            del self._pending_after[stream]
        # 2. What another consumer was given and left (a replica that went away).
        if self._claim_idle_ms and time.monotonic() - self._claimed > self._claim_idle_ms / 2000:
            for stream in self._streams:
                entries = await self._source.claim(
                    stream, self._group, self._consumer, self._claim_idle_ms, self._batch
                )
                if entries:
                    return entries
            self._claimed = time.monotonic()
        # 3. New entries: one stream blocks; several are polled, then the caller waits.
        if len(self._streams) == 1:
            return await self._source.read(
                self._streams[0], self._group, self._consumer, NEW, self._batch, block_ms
            )
        for stream in self._streams:
            entries = await self._source.read(
                stream, self._group, self._consumer, NEW, self._batch, 0
            )
            if entries:
                return entries
        if block_ms:
            await asyncio.sleep(min(block_ms, 1000) / 1000)
        return []

    async def ack(self, entries: Sequence[Entry]) -> None:
        by_stream: dict[str, list[str]] = {}
        for entry in entries:
            by_stream.setdefault(entry.stream, []).append(entry.id)
        for stream, ids in by_stream.items():
            await self._source.ack(stream, self._group, ids)

    async def _refresh(self) -> None:
        if time.monotonic() - self._refreshed < self._refresh_s and self._streams:
            return
        self._refreshed = time.monotonic()
        first = self._rounds == 0
        self._rounds += 1
        created: list[str] = []
        existed = False
        for stream in await self._source.streams():
            if stream in self._streams:
                continue
            start = "0" if self._from_start or not first else "$"
            if await self._source.ensure_group(stream, self._group, start):
                created.append(stream)
            else:
                existed = True
                self.trimmed += await self._source.trimmed_unread(stream, self._group)
            self._streams.append(stream)
            self._pending_after[stream] = "0"
        if first and existed and not self._from_start:
            # The group is not new (a restart): a stream it lacked (Cluster: a slot first used
            # while this reader was away) is read from its start, or those records are skipped.
            for stream in created:
                await self._source.rewind(stream, self._group)


class _SentinelAware(RedisRecords):
    def __init__(
        self, client: Redis | RedisCluster, helpers: Sequence[Redis], base: str, cluster: bool
    ) -> None:
        super().__init__(client, base, cluster=cluster)
        self._helpers = tuple(helpers)

    async def close(self) -> None:
        await super().close()
        for helper in self._helpers:
            with contextlib.suppress(*_FAILURES):
                await helper.aclose()


def redis_records(url: str, base: str, timeout_s: float) -> RedisRecords:
    """The export streams of the store at ``url``, on a client of their own.

    ``timeout_s`` must outlast the longest blocking read; raises ``StoreUnavailable`` on a URL
    redis-py refuses."""
    from extproc.config import redact_url
    from extproc.store.redis import connect

    try:
        client, helpers = connect(url, timeout_s)
    except (ValueError, RedisError) as exc:
        raise StoreUnavailable(
            f"cannot configure redis at {redact_url(url)}: {type(exc).__name__}"
        ) from None
    return _SentinelAware(client, helpers, base, isinstance(client, RedisCluster))
