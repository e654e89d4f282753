"""What a shared budget costs an admission on Redis and Redis Cluster (README "Budgets on Redis Cluster").

Starts a local redis-server and a three-master Redis Cluster (tests/redis_fixtures.py), admits
3,000 requests one after another through the limiter with no budget, a user's monthly budget
(the user's slot) and a group's monthly budget (a slot of its own), and prints p50 / p99 latency
and CPU per admission. Run: ``python -m bench.budget_slots``.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from extproc.config import LimitsConfig, Secret, StoreConfig
from extproc.domain import Limits
from extproc.limits.budgets import parse_budgets
from extproc.limits.limiter import Limiter
from extproc.store.redis import RedisStore
from tests.redis_fixtures import RedisClusterProcesses, RedisServer

ADMISSIONS = 3000
HUGE = 10**12
GROUP = [{"name": "team", "scope": "group", "groups": ["eng"], "limit": HUGE, "period": "month"}]
MINE = [{"name": "mine", "limit": HUGE, "period": "month"}]


async def measure(
    url: str, budgets: list[dict[str, Any]], groups: tuple[str, ...], label: str
) -> None:
    store = RedisStore.from_config(StoreConfig(url=Secret(url), timeout_s=2.0))
    config = LimitsConfig(tiers={"free": Limits(tokens=HUGE)}, budgets=parse_budgets(budgets))
    limiter = Limiter(store, config, lambda: time.time_ns() // 1_000_000)
    for i in range(200):  # warm: scripts loaded, the users' day sets written
        await limiter.admit(f"u{i % 50}", "free", "m", 10, request_id=f"w{label}{i}", groups=groups)
    samples = []
    cpu = time.process_time()
    for i in range(ADMISSIONS):
        started = time.perf_counter()
        await limiter.admit(f"u{i % 50}", "free", "m", 10, request_id=f"{label}{i}", groups=groups)
        samples.append(time.perf_counter() - started)
    cpu_us = (time.process_time() - cpu) / ADMISSIONS * 1e6
    samples.sort()
    p50, p99 = samples[ADMISSIONS // 2] * 1e6, samples[int(ADMISSIONS * 0.99)] * 1e6
    print(f"{label:34s} p50 {p50:6.0f} µs  p99 {p99:6.0f} µs  CPU {cpu_us:5.0f} µs per admission")
    await store.close()


async def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="budget-slots-"))
    single, cluster = RedisServer(folder / "single"), RedisClusterProcesses(folder / "cluster")
    single.start()
    cluster.start()
    try:
        for url, where in ((single.url, "redis"), (cluster.url, "cluster")):
            await measure(url, [], (), f"{where}: no budget")
            await measure(url, MINE, (), f"{where}: user monthly budget")
            await measure(url, GROUP, ("eng",), f"{where}: group monthly budget")
    finally:
        cluster.stop()
        single.stop()


if __name__ == "__main__":
    asyncio.run(main())
