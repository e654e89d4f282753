"""`python -m bench.usage_api` (`make bench-usage`): the usage API's listings over a large ledger.

Loads a fresh loopback redis-server with ``--users`` × ``--days`` × ``--models`` ledger rows,
written in the ledger's own format (``store.ledger`` codec, the day's users set) as the settle
writes them, half of the users booked to a subscription with one or two API keys, then times
the usage API's real entry points over HTTP with a RedisStore: the first page of a listing of
every user (one scan of the ledger), the pages after it and other sort orders (from the
snapshot), a filtered listing, the per-key view, one user's usage, and the design this replaced
(one round trip per user). While the scan runs, a ticker in the same event loop records the
longest stall the sidecar's own requests would see (the API runs in worker 0). Writes its
section of docs/benchmarks.md (``bench.sections``), which ``make bench`` keeps.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import shlex
import signal
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import hiredis
import httpx
from redis.asyncio import Redis

from bench import sections
from bench.__main__ import ROOT, _interrupt, redis_server
from extproc.authz.api_keys import ApiKeyIdentities
from extproc.config import Secret, StoreConfig
from extproc.observability.usage_api import UsageApi
from extproc.observability.usage_query import SUBSCRIPTION_GROUPS
from extproc.stack import free_port
from extproc.store import keys, ledger
from extproc.store.base import Attribution, LedgerEntry
from extproc.store.pipelined import pack
from extproc.store.redis import RedisStore

ADMIN = {"Authorization": "Bearer demo-admin-key"}
SUBSCRIPTION = "models-as-a-service/premium-subscription"
LOAD_BATCH = 2000


def entries(users: int, days: list[str], models: int) -> Iterator[LedgerEntry]:
    for n in range(users):
        user = f"user-{n:06d}"
        for d, day in enumerate(days):
            for m in range(models):
                booked = Attribution()
                if n % 2:  # half the users in the subscription era, with one or two keys
                    booked = Attribution(SUBSCRIPTION, f"key-{(n + d + m) % 2}", "org-1", "cc-1")
                prompt = 10 + (n * 7 + d * 3 + m) % 500
                yield LedgerEntry(user, day, f"model-{m}", prompt, 20, prompt + 20, 0, 1, booked)


def load(port: int, users: int, days: list[str], models: int) -> float:
    """Write the ledger as settles would: each hash holds the sums of ``ledger.entry_fields`` of
    its entries (what their HINCRBYs add up to, in one HSET), and the day's users set."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        reader = hiredis.Reader()
        commands: list[bytes] = []

        def flush() -> None:
            sock.sendall(b"".join(commands))
            pending = len(commands)
            commands.clear()
            while pending:
                reader.feed(sock.recv(1 << 20))
                while (reply := reader.gets()) is not False:
                    if isinstance(reply, hiredis.ReplyError):
                        raise SystemExit(f"redis refused the load: {reply}")
                    pending -= 1

        hashes: dict[tuple[str, str], dict[str, int]] = {}
        for item in entries(users, days, models):
            fields = hashes.setdefault((item.userid, item.day), {})
            for field, amount in ledger.entry_fields(item):
                fields[field] = fields.get(field, 0) + amount
            if len(hashes) >= LOAD_BATCH:
                commands += _writes(hashes)
                flush()
        commands += _writes(hashes)
        # Every hash here was written with its totals, from the first day on (RedisStore.start).
        commands.append(pack(("SET", keys.ledger_totals_since_key(), days[0])))
        flush()
    return time.perf_counter() - started


def _writes(hashes: dict[tuple[str, str], dict[str, int]]) -> list[bytes]:
    out = []
    for (user, day), fields in hashes.items():
        pairs = [part for field, amount in fields.items() for part in (field, amount)]
        out.append(pack(("HSET", keys.ledger_key(user, day), *pairs)))
        out.append(pack(("SADD", keys.ledger_users_key(day), user)))
    hashes.clear()
    return out


async def timed(call: Callable[[], Awaitable[httpx.Response]]) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = await call()
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise SystemExit(f"{response.request.url}: {response.status_code} {response.text[:200]}")
    return elapsed, response


class Ticker:
    """The longest gap between 10 ms sleeps in this event loop: how long the loop stalled."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            self.worst = max(self.worst, time.perf_counter() - before - 0.01)

    def __enter__(self) -> Ticker:
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def measure(url: str, users: int, days: list[str], old_sample: int) -> list[tuple[str, str]]:
    store = RedisStore.from_config(StoreConfig(url=Secret(url), timeout_s=30.0))
    first_day = dt.datetime.strptime(days[0], "%Y%m%d").date()
    last_day = dt.datetime.strptime(days[-1], "%Y%m%d").date()
    api = UsageApi(
        store,
        ApiKeyIdentities.from_file(ROOT / "deploy" / "local" / "api-keys.yaml"),
        retention_days=90,
        admin_group="maas-admins",
        groups=SUBSCRIPTION_GROUPS,
        today=lambda: last_day,
    )
    port = free_port()
    await api.start("127.0.0.1", port)
    period = {"from": first_day.isoformat(), "to": last_day.isoformat()}
    figures: list[tuple[str, str]] = []
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=600, headers=ADMIN
        ) as http:

            def get(path: str, **params: str) -> Callable[[], Awaitable[httpx.Response]]:
                return lambda: http.get(path, params={**period, **params})

            rss_before = rss_mb()
            with Ticker() as ticker:
                cold, first = await timed(
                    get("/v1/usage/users", sort="total_tokens", order="desc", limit="100")
                )
            body = first.json()
            figures.append(
                (
                    f"`/v1/usage/users`, first page (scans {body['count']:,} users ×"
                    f" {len(days)} days), sort=total_tokens desc, limit=100",
                    f"{cold:.2f} s (longest event-loop stall meanwhile: {ticker.worst * 1000:.0f} ms)",
                )
            )
            figures.append(
                ("memory held by that snapshot (RSS growth)", f"{rss_mb() - rss_before:.0f} MB")
            )
            token = body["next_page_token"]
            pages: list[float] = []
            while token and len(pages) < 20:
                elapsed, page = await timed(
                    get("/v1/usage/users", sort="total_tokens", order="desc", page_token=token)
                )
                pages.append(elapsed)
                token = page.json()["next_page_token"]
            figures.append(
                (
                    "a next page (page_token, limit=100), median of 20",
                    f"{statistics.median(pages) * 1000:.1f} ms",
                )
            )
            elapsed, _ = await timed(get("/v1/usage/users", sort="requests", limit="100"))
            figures.append(
                (
                    "another sort order of the same listing (first sort of it)",
                    f"{elapsed * 1000:.0f} ms",
                )
            )
            elapsed, _ = await timed(get("/v1/usage/users", sort="requests", limit="100"))
            figures.append(
                ("the same first page again (within fresh_s)", f"{elapsed * 1000:.1f} ms")
            )
            started = time.perf_counter()
            token, count = None, 0
            while True:
                params = {**period, "limit": "1000"} | ({"page_token": token} if token else {})
                page = (await http.get("/v1/usage/users", params=params)).json()
                count += len(page["rows"])
                token = page["next_page_token"]
                if token is None:
                    break
            figures.append(
                (
                    f"every page of the listing, limit=1000 ({count:,} rows)",
                    f"{time.perf_counter() - started:.2f} s",
                )
            )
            with Ticker() as ticker:
                elapsed, _ = await timed(get("/v1/usage/users", model="model-1", limit="100"))
            figures.append(
                (
                    "`/v1/usage/users?model=model-1`, first page (a new scan)",
                    f"{elapsed:.2f} s (stall {ticker.worst * 1000:.0f} ms)",
                )
            )
            with Ticker() as ticker:
                elapsed, keys_page = await timed(
                    get("/v1/usage/keys", subscription=SUBSCRIPTION, sort="total_tokens")
                )
            figures.append(
                (
                    f"`/v1/usage/keys` of every user in a subscription, first page"
                    f" ({keys_page.json()['count']:,} keys)",
                    f"{elapsed:.2f} s (stall {ticker.worst * 1000:.0f} ms)",
                )
            )
            one = []
            for n in range(1, 40, 2):
                elapsed, _ = await timed(get("/v1/usage", user=f"user-{n:06d}", group_by="key"))
                one.append(elapsed)
            figures.append(
                (
                    "`/v1/usage?user=…&group_by=key`, median of 20",
                    f"{statistics.median(one) * 1000:.1f} ms",
                )
            )
            own = []
            for n in range(1, 40, 2):
                elapsed, _ = await timed(get("/v1/usage/keys", user=f"user-{n:06d}"))
                own.append(elapsed)
            figures.append(
                ("`/v1/usage/keys?user=…`, median of 20", f"{statistics.median(own) * 1000:.1f} ms")
            )
        # The design this replaced (GET /v1/usage/users before issue #16): for each user in
        # turn, a redis-py pipeline of HGETALL of each day, folded into rows.
        everyone = await store.ledger_users(days)
        client = Redis.from_url(url, decode_responses=True)
        started = time.perf_counter()
        for user in everyone[:old_sample]:
            pipe = client.pipeline(transaction=False)
            for day in days:
                pipe.hgetall(keys.ledger_key(user, day))
            for day, fields in zip(days, await pipe.execute(), strict=True):
                ledger.rows(day, {str(k): int(v) for k, v in fields.items()})
        per_user = (time.perf_counter() - started) / old_sample
        await client.aclose()
        figures.append(
            (
                f"before issue #16: one round trip a user, the whole page at once (timed over"
                f" {old_sample:,} users)",
                f"{per_user * 1e6:.0f} µs a user, so ≈ {per_user * len(everyone):.0f} s"
                f" for {len(everyone):,}",
            )
        )
    finally:
        await api.stop()
        await store.close()
    return figures


def section(
    figures: list[tuple[str, str]], command: str, users: int, days: int, models: int, load_s: float
) -> str:
    lines = [
        "## Usage API over a large ledger",
        "",
        f"Command: `{command}`. Written by `bench/usage_api.py`; `make bench` keeps this section.",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python"
        f" {platform.python_version()}; a local redis-server, everything on the same machine"
        f" (load average {os.getloadavg()[0]:.1f} when the run ended: other work shared the"
        " cores, so times are upper bounds).",
        "",
        f"Ledger: {users:,} users × {days} days × {models} models ({users * days * models:,} rows,"
        f" half of the users booked to a subscription with two API keys), loaded in {load_s:.0f} s"
        " in the settle's own field format. Times are wall clock through the HTTP API.",
        "",
        "| what | time |",
        "|---|---|",
        *(f"| {what} | {value} |" for what, value in figures),
        "",
        "How it is read: a listing of every user without filters reads only each (user, day)"
        " hash's totals (one HMGET of its per-kind total fields, which every settle adds to"
        " besides the model's fields), 256 users a batch, each batch one write and one read on"
        " a socket of its own (`store/bulk.py`: no future per command, and the hot path's"
        " socket never waits behind it). Filtered listings and the per-key view need the model"
        " and attribution of each amount, so they read whole hashes (HGETALL), 64 users a"
        " batch. Either way the result is kept as a snapshot: the other pages and sort orders,"
        " and the same listing asked again within 10 s, are read from memory, and pages stay"
        " consistent while settles go on. The cost grows with users × days, so a listing of"
        " every user spans at most 31 days; one user's usage and keys stay one round trip."
        " The longest event-loop stall is the read of the days' user sets (SMEMBERS of every"
        " user id) and the first sort of the snapshot; the API runs in worker 0 beside the"
        " gRPC services, whose requests wait that long during a first page.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    # Stopped from outside: unwind, so the redis-server this run started is stopped too.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--old-sample", type=int, default=5_000, help="users timed the old way")
    parser.add_argument("--redis", default="on", help="on (start one) or a redis:// URL")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    today = dt.datetime.now(tz=dt.UTC).date()
    days = [(today - dt.timedelta(days=i)).strftime("%Y%m%d") for i in range(args.days)][::-1]
    with redis_server(args.redis) as (url, counter):
        if counter is None:
            raise SystemExit("bench.usage_api needs Redis: a redis-server on PATH or --redis URL")
        print(f"loading {args.users:,} users × {args.days} days × {args.models} models ...")
        load_s = load(counter.port, args.users, days, args.models)
        print(f"loaded in {load_s:.1f} s")
        figures = asyncio.run(measure(url, args.users, days, args.old_sample))
    command = "python -m bench.usage_api " + shlex.join(sys.argv[1:])
    text = section(figures, command.strip(), args.users, args.days, args.models, load_s)
    print(text)
    sections.write(Path(args.out), "usage-api", text)
    print(f"wrote its section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
