"""A small HTTP/1.1 load generator: closed loop (max throughput) or open loop (fixed rate).

Run as its own process so its CPU is not counted as the sidecar's:
``python -m bench.load --port P --path /x --body '{..}' --conns 16 --seconds 5 [--rate R]``.
It prints one JSON object: requests, errors, status counts, rps and latency percentiles (ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: int = 0


def build_request(host: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    method = "POST" if body else "GET"
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: keep-alive"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one response; returns its status. Handles content-length and chunked bodies."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                return status
    index = lower.find(b"content-length:")
    if index >= 0:
        end = lower.index(b"\r\n", index)
        await reader.readexactly(int(lower[index + 15 : end]))
    return status


async def connection(
    port: int, request: bytes, deadline: float, tally: Tally, tickets: asyncio.Queue[float] | None
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while True:
            if tickets is not None:
                scheduled = await tickets.get()
                if scheduled < 0:
                    return
            else:
                scheduled = time.perf_counter()
            if scheduled >= deadline:
                return
            writer.write(request)
            try:
                status = await read_response(reader)
            except (asyncio.IncompleteReadError, ConnectionError, ValueError):
                tally.errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            # Open loop: latency counts from the scheduled send time (no coordinated omission).
            tally.latencies.append(time.perf_counter() - scheduled)
            tally.statuses[status] += 1
    finally:
        writer.close()


async def ticker(rate: float, deadline: float, tickets: asyncio.Queue[float], conns: int) -> None:
    interval = 1.0 / rate
    next_at = time.perf_counter()
    while next_at < deadline:
        now = time.perf_counter()
        if next_at > now:
            await asyncio.sleep(next_at - now)
        tickets.put_nowait(next_at)
        next_at += interval
    for _ in range(conns):
        tickets.put_nowait(-1.0)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, int(q * len(sorted_values)))
    return sorted_values[index]


async def run(args: argparse.Namespace) -> dict[str, object]:
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    request = build_request(f"127.0.0.1:{args.port}", args.path, args.body.encode(), headers)
    tally = Tally()
    # Warm up: open the connections and serve a few requests before measuring.
    warm = Tally()
    warm_deadline = time.perf_counter() + args.warmup
    await asyncio.gather(
        *(connection(args.port, request, warm_deadline, warm, None) for _ in range(args.conns))
    )
    started = time.perf_counter()
    deadline = started + args.seconds
    tickets: asyncio.Queue[float] | None = None
    tasks = []
    if args.rate > 0:
        tickets = asyncio.Queue()
        tasks.append(asyncio.create_task(ticker(args.rate, deadline, tickets, args.conns)))
    tasks += [
        asyncio.create_task(connection(args.port, request, deadline, tally, tickets))
        for _ in range(args.conns)
    ]
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    lat = sorted(tally.latencies)
    return {
        "requests": len(lat),
        "warmup_requests": len(warm.latencies) + warm.errors,  # served too: count them for CPU
        "errors": tally.errors,
        "statuses": dict(tally.statuses),
        "seconds": elapsed,
        "rps": len(lat) / elapsed if elapsed else 0.0,
        "p50_ms": percentile(lat, 0.50) * 1000,
        "p90_ms": percentile(lat, 0.90) * 1000,
        "p99_ms": percentile(lat, 0.99) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--body", default="")
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--conns", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s; 0: closed loop")
    args = parser.parse_args()
    try:
        import uvloop

        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
