"""What the export stream adds to a settle: the record built in the sidecar, the XADD in Redis.

Runs the same settles (a token counter, the ledger entry and the hold release: what a charged
request's settle carries) through the pipelined Redis store with ``export.stream`` off, then on,
16 at a time, and prints per settle: the sidecar's CPU (process time, record encoding included),
Redis's CPU for the EVALSHA (``INFO commandstats``, XADD included) and Redis memory per record.

    redis-server --port 6390 --save '' --appendonly no &
    .venv/bin/python -m bench.export_cost --url redis://127.0.0.1:6390/0 --settles 20000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from redis.asyncio import Redis

from extproc.config import ExportStreamConfig, LimitsConfig, Secret, StoreConfig
from extproc.domain import Charge, Usage
from extproc.limits.limiter import Limiter
from extproc.store.redis import RedisStore

CONCURRENCY = 16


def _clock() -> int:
    return time.time_ns() // 1_000_000


def _charge(n: int, admitted_ms: int, window: int) -> Charge:
    return Charge(
        userid=f"user-{n % 500}",
        tier="premium",
        model="facebook/opt-125m",
        usage=Usage(prompt_tokens=30, completion_tokens=40, total_tokens=70, cached_tokens=10),
        reserved_tokens=296,
        token_windows=(window,),
        request_id=f"{n:08x}-3b1d-4e5f-9a8b-7c6d5e4f3a2b",
        admitted_ms=admitted_ms,
    )


async def _run(url: str, settles: int, export: bool) -> tuple[float, float, float]:
    raw = Redis.from_url(url, decode_responses=True)
    await raw.flushdb()
    stream = ExportStreamConfig(enabled=export, maxlen=0)
    store = RedisStore.from_config(StoreConfig(url=Secret(url), timeout_s=5.0), stream)
    await store.start()
    limiter = Limiter(store, LimitsConfig(), _clock, export=export)
    now = _clock()
    charges = [_charge(n, now, now) for n in range(settles)]
    await raw.config_resetstat()
    queue = iter(charges)

    async def worker() -> None:
        for charge in queue:
            await limiter.settle(charge)

    cpu = time.process_time()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    cpu = time.process_time() - cpu
    stats = await raw.info("commandstats")
    redis_us = float(stats["cmdstat_evalsha"]["usec_per_call"])
    memory = float(await raw.memory_usage("maas:export", samples=0) or 0) if export else 0.0
    await store.close()
    await raw.aclose()
    return cpu / settles * 1e6, redis_us, memory / settles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="a scratch Redis (it is flushed)")
    parser.add_argument("--settles", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5, help="off/on pairs; medians are shown")
    args = parser.parse_args()
    runs: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
    for _ in range(args.rounds):  # alternated, so a busy machine weighs on both alike
        for export in (False, True):
            runs[export].append(asyncio.run(_run(args.url, args.settles, export)))
    print(
        "| export.stream | sidecar CPU µs/settle, median (min) "
        "| Redis µs/EVALSHA, median (min) | Redis bytes/record |"
    )
    print("|---|---|---|---|")
    for export, results in runs.items():
        sidecar, redis_us, memory = (list(column) for column in zip(*results, strict=True))
        print(
            f"| {'on' if export else 'off'} "
            f"| {statistics.median(sidecar):.1f} ({min(sidecar):.1f}) "
            f"| {statistics.median(redis_us):.1f} ({min(redis_us):.1f}) "
            f"| {statistics.median(memory):.0f} |"
        )


if __name__ == "__main__":
    main()
