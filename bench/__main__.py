"""`make bench`: load the local stack in each topology and write docs/benchmarks.md.

For every topology (Envoy alone, ext_authz only, ext_authz + ext_proc STREAMED, ext_authz +
ext_proc observability mode, ext_proc-only admission, split) and sidecar worker count, and every
scenario (JSON, fast SSE, paced SSE of 10 and of 50 tokens, denial), it measures in one run on
this machine:
- closed-loop throughput, and its ratio to Envoy alone;
- sidecar CPU per request (utime + stime from /proc, every worker process), Envoy's CPU for the
  same requests, and the ratio of the two (issue #17's goal (a): at most 1 for a JSON request);
- per extra streamed chunk, from the two paced stream lengths: the sidecar's CPU, Envoy's, and
  their ratio (goal (b): at most 1/4);
- latency at a fixed offered rate (open loop; half of Envoy alone's closed-loop rate), p50/p99,
  and what the sidecar adds over Envoy alone at the same rate;
- Redis round trips and Redis's own CPU (``INFO cpu``) per request, when the sidecar runs against
  Redis (the default when a ``redis-server`` binary is installed: the harness starts one on a
  free loopback port).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import sections
from extproc.stack import LocalStack, Topology, free_port

ROOT = Path(__file__).resolve().parent.parent
CONFIG = Path(__file__).resolve().parent / "config.yaml"
BASELINE = Path(__file__).resolve().parent / "baseline.md"
CHAT = "/llm/facebook-opt-125m-simulated/v1/chat/completions"
KEY = "demo-enterprise-key"
SHORT_STREAM, LONG_STREAM = 10, 50  # tokens (one SSE chunk each) of the two paced streams
FLOOR = " — do-nothing floor"
QUICK = ["--seconds", "3", "--workers", "1", "--no-floor", "--no-latency"]
QUICK_SCENARIOS = "json,sse-paced-10,sse-paced-50"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Scenario:
    name: str
    body: dict[str, Any]
    headers: tuple[str, ...] = (f"Authorization: Bearer {KEY}",)
    conns: int = 16

    @property
    def body_text(self) -> str:
        return json.dumps(self.body)


def _messages() -> list[dict[str, str]]:
    return [{"role": "user", "content": "Say something short about gateways."}]


def _stream(max_tokens: int) -> dict[str, Any]:
    return {
        "model": "sim-model",
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": _messages(),
    }


SCENARIOS = {
    "json": Scenario("json", {"model": "sim-model", "max_tokens": 16, "messages": _messages()}),
    "sse": Scenario("sse", _stream(16)),
    # A stream whose client did not ask for usage: the sidecar rewrites the request to ask.
    "sse-no-usage": Scenario(
        "sse-no-usage",
        {"model": "sim-model", "max_tokens": 16, "stream": True, "messages": _messages()},
    ),
    # Two paced streams that differ only in length: one chunk per token, so their difference
    # divided by 40 is what one extra chunk costs (goal (b) of issue #17).
    "sse-paced-10": Scenario(
        "sse-paced-10",
        _stream(SHORT_STREAM),
        headers=(f"Authorization: Bearer {KEY}", "x-sim-delay-ms: 2"),
        conns=32,
    ),
    "sse-paced-50": Scenario(
        "sse-paced-50",
        _stream(LONG_STREAM),
        headers=(f"Authorization: Bearer {KEY}", "x-sim-delay-ms: 2"),
        conns=32,
    ),
    "denied": Scenario(
        "denied",
        {"model": "sim-model", "messages": _messages()},
        headers=("Authorization: Bearer not-a-valid-key",),
    ),
}

TOPOLOGIES: dict[str, Topology] = {
    "envoy alone": "envoy",
    "ext_authz only": "authz",
    "ext_authz + ext_proc STREAMED": "full",
    "ext_authz + ext_proc observability": "observability",
    "ext_proc-only admission": "extproc",
    "split: observability + on-demand injector": "split",
    "accesslog: usage read by Envoy + access log": "accesslog",
    "lean: accesslog + ext_authz over HTTP": "lean",
}


def process_tree_cpu_s(root_pid: int) -> float:
    """utime + stime of ``root_pid`` and its descendants, in seconds."""
    children: dict[int, list[int]] = {}
    stats: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        pid, ppid = int(entry), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        stats[pid] = (int(fields[11]), int(fields[12]))
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        utime, stime = stats.get(pid, (0, 0))
        total += utime + stime
        stack.extend(children.get(pid, []))
    return total / CLK_TCK


class RedisCounter:
    """Round trips the sidecar makes: top-level EVALSHA and SADD calls from ``INFO commandstats``.

    A script's inner commands are counted by Redis too, so only the commands a client sends are
    summed; the SADD + PEXPIRE pair of a user's first charge of the day is one pipelined trip.
    """

    def __init__(self, port: int) -> None:
        self.port = port

    def _info(self, section: bytes) -> list[str]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(b"INFO " + section + b"\r\n")
            data = b""
            while not data.endswith(b"\r\n") or data.count(b"\r\n") < 2:
                data += sock.recv(65536)
        return data.decode().splitlines()

    def round_trips(self) -> int:
        total = 0
        for line in self._info(b"commandstats"):
            if line.startswith(("cmdstat_evalsha:", "cmdstat_sadd:")):
                total += int(line.split("calls=", 1)[1].split(",", 1)[0])
        return total

    def cpu_s(self) -> float:
        """Redis's own CPU so far (``INFO cpu``: used_cpu_user + used_cpu_sys of the server)."""
        total = 0.0
        for line in self._info(b"cpu"):
            if line.startswith(("used_cpu_user:", "used_cpu_sys:")):
                total += float(line.split(":", 1)[1])
        return total


@contextlib.contextmanager
def redis_server(mode: str) -> Iterator[tuple[str, RedisCounter | None]]:
    """The store URL for the sidecar: a fresh loopback redis-server, a given URL, or memory."""
    binary = shutil.which("redis-server")
    if mode == "off" or (mode == "auto" and binary is None):
        yield "memory://", None
        return
    if mode not in ("auto", "on"):
        port = int(mode.rsplit(":", 1)[1].split("/", 1)[0])
        yield mode, RedisCounter(port)
        return
    if binary is None:
        raise SystemExit("--redis on: no redis-server on PATH")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", RedisCounter(port)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def load(port: int, scenario: Scenario, seconds: float, rate: float = 0.0) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "bench.load", "--port", str(port), "--path", CHAT,
        "--body", scenario.body_text, "--conns", str(scenario.conns),
        "--seconds", str(seconds), "--rate", str(rate),
    ]  # fmt: skip
    for header in scenario.headers:
        cmd += ["--header", header]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    result: dict[str, Any] = json.loads(out)
    return result


@dataclass
class Row:
    topology: str
    workers: int
    scenario: str
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float  # sidecar CPU per request
    envoy_cpu_us: float
    redis_trips: float = -1.0  # -1: not measured (memory store)
    redis_cpu_us: float = -1.0  # Redis's CPU per request; -1: not measured
    rate: float = 0.0  # half Envoy alone's throughput
    open_p50_ms: float = 0.0
    open_p99_ms: float = 0.0
    fixed_p50_ms: float = 0.0  # at --rate, the same modest rate for every topology
    fixed_p99_ms: float = 0.0
    errors: int = 0
    statuses: str = ""

    @property
    def ratio(self) -> float:
        """Sidecar CPU over Envoy's for the same requests (goal (a): at most 1 for JSON)."""
        return self.cpu_us / self.envoy_cpu_us if self.envoy_cpu_us else 0.0


@dataclass(frozen=True)
class Goals:
    """One topology and worker count against issue #17's two goals, from rows of one run."""

    topology: str
    workers: int
    request_ratio: float | None  # (a): sidecar / Envoy CPU for a JSON request
    chunk_sidecar_us: float | None  # (b): CPU per extra streamed chunk, from the paced pair
    chunk_envoy_us: float | None

    @property
    def chunk_ratio(self) -> float | None:
        if self.chunk_sidecar_us is None or not self.chunk_envoy_us:
            return None
        return max(0.0, self.chunk_sidecar_us) / self.chunk_envoy_us

    @property
    def met(self) -> str:
        if FLOOR in self.topology:
            return "(a floor, not a sidecar)"
        if self.request_ratio is None or self.chunk_ratio is None:
            return "-"
        a, b = self.request_ratio <= 1.0, self.chunk_ratio <= 0.25
        return {(True, True): "both", (True, False): "(a) only", (False, True): "(b) only"}.get(
            (a, b), "neither"
        )


def goals(rows: list[Row]) -> list[Goals]:
    """Per (topology, workers): the JSON ratio, and the per-chunk CPU from the two paced streams."""
    found: dict[tuple[str, int], dict[str, Row]] = {}
    for r in rows:
        found.setdefault((r.topology, r.workers), {})[r.scenario] = r
    out = []
    extra = LONG_STREAM - SHORT_STREAM
    for (topology, workers), by in found.items():
        json_row, short, long = by.get("json"), by.get("sse-paced-10"), by.get("sse-paced-50")
        chunk_sidecar = chunk_envoy = None
        if short and long:
            chunk_sidecar = (long.cpu_us - short.cpu_us) / extra
            chunk_envoy = (long.envoy_cpu_us - short.envoy_cpu_us) / extra
        out.append(
            Goals(
                topology,
                workers,
                json_row.ratio if json_row and json_row.cpu_us else None,
                chunk_sidecar,
                chunk_envoy,
            )
        )
    return out


def goals_table(found: list[Goals]) -> list[str]:
    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [
        "| topology | workers | (a) sidecar / Envoy CPU, JSON request | sidecar µs / extra chunk"
        " | Envoy µs / extra chunk | (b) sidecar / Envoy per chunk | goals met |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in found:
        lines.append(
            f"| {g.topology} | {g.workers} | {num(g.request_ratio, '.2f')} | "
            f"{num(g.chunk_sidecar_us, '.1f')} | {num(g.chunk_envoy_us, '.1f')} | "
            f"{num(g.chunk_ratio, '.2f')} | {g.met} |"
        )
    return lines


def measure(
    topology_name: str,
    workers: int,
    seconds: float,
    base_rates: dict[str, float],
    scenarios: list[Scenario],
    store_url: str,
    redis: RedisCounter | None,
    fixed_rate: float,
    floor: bool = False,
    latency: bool = True,
    source: Path | None = None,
) -> list[Row]:
    """One stack, every scenario. ``source``: run the sidecar from that checkout instead (the
    "before" of a change, measured in the same run as the "after")."""
    topology = TOPOLOGIES[topology_name]
    rows = []
    env = {"MAAS_EXTPROC_STORE_URL": store_url}
    stack = LocalStack(config_path=CONFIG, workers=workers, topology=topology, env=env)
    if floor:
        stack.sidecar_command = [sys.executable, "-m", "bench.floor"]
        topology_name += FLOOR
        redis = None
    elif source is not None:
        stack.sidecar_command = sidecar_from(source)
        topology_name += f" (before: {source.name})"
    with stack:
        sidecar = stack.procs.get("sidecar")
        envoy = stack.procs["envoy"]
        for scenario in scenarios:
            if (topology == "envoy" or floor) and scenario.name == "denied":
                continue
            before = process_tree_cpu_s(sidecar.pid) if sidecar else 0.0
            envoy_before = process_tree_cpu_s(envoy.pid)
            trips_before = redis.round_trips() if redis and sidecar else 0
            redis_cpu_before = redis.cpu_s() if redis and sidecar else 0.0
            closed = load(stack.listen_port, scenario, seconds)
            cpu = (process_tree_cpu_s(sidecar.pid) - before) if sidecar else 0.0
            envoy_cpu = process_tree_cpu_s(envoy.pid) - envoy_before
            # CPU and Redis counters also saw the warm-up requests: divide by everything served.
            total = max(1, closed["requests"] + closed["errors"] + closed["warmup_requests"])
            row = Row(
                topology_name,
                workers,
                scenario.name,
                closed["rps"],
                closed["p50_ms"],
                closed["p99_ms"],
                cpu / total * 1e6,
                envoy_cpu / total * 1e6,
                errors=closed["errors"],
                statuses=",".join(f"{k}:{v}" for k, v in sorted(closed["statuses"].items())),
            )
            if redis and sidecar:
                # Charges settle just before the last reply: let the final ones land.
                time.sleep(0.2)
                row.redis_trips = (redis.round_trips() - trips_before) / total
                row.redis_cpu_us = (redis.cpu_s() - redis_cpu_before) / total * 1e6
            if topology == "envoy":
                base_rates[scenario.name] = closed["rps"]
            rate = base_rates.get(scenario.name, closed["rps"]) / 2
            if latency:
                opened = load(stack.listen_port, scenario, seconds, rate=rate)
                row.rate, row.open_p50_ms, row.open_p99_ms = (
                    rate,
                    opened["p50_ms"],
                    opened["p99_ms"],
                )
                fixed = load(stack.listen_port, scenario, seconds, rate=min(fixed_rate, rate))
                row.fixed_p50_ms, row.fixed_p99_ms = fixed["p50_ms"], fixed["p99_ms"]
            rows.append(row)
            trips = (
                f" redis {row.redis_trips:.2f}/req {row.redis_cpu_us:4.0f} us"
                if row.redis_trips >= 0
                else ""
            )
            latencies = (
                f"  @{fixed_rate:.0f}/s p50 {row.fixed_p50_ms:.2f} p99 {row.fixed_p99_ms:.2f}"
                f"  @{rate:.0f}/s p50 {row.open_p50_ms:.2f} p99 {row.open_p99_ms:.2f} ms"
                if latency
                else ""
            )
            print(
                f"{topology_name:36} w={workers} {scenario.name:13} {row.rps:8.0f} rps "
                f"cpu {row.cpu_us:6.0f} us/req envoy {row.envoy_cpu_us:5.0f} "
                f"ratio {row.ratio:5.2f}{trips}{latencies}  [{row.statuses}]",
                flush=True,
            )
    return rows


def sidecar_from(source: Path) -> list[str]:
    """``extproc serve`` imported from another checkout; spawned workers inherit its sys.path."""
    boot = (
        f"import sys; sys.path.insert(0, {str(source)!r}); "
        "from extproc.__main__ import main; sys.exit(main())"
    )
    return [sys.executable, "-c", boot, "serve", "--config", str(CONFIG)]


def table(rows: list[Row], fixed_rate: float) -> list[str]:
    base = {r.scenario: r for r in rows if r.topology == "envoy alone"}
    lines = [
        "| topology | workers | scenario | max rps | vs Envoy | sidecar CPU µs/req"
        " | Envoy CPU µs/req | sidecar / Envoy | Redis trips/req | Redis CPU µs/req"
        f" | p50 / p99 ms at {fixed_rate:.0f}/s | added p50 / p99 ms at {fixed_rate:.0f}/s"
        " | rate = ½ Envoy alone | p50 / p99 ms there | added p50 / p99 ms there | statuses |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = base.get(r.scenario)
        share = f"{r.rps / ref.rps:.2f}" if ref and ref.rps else "-"
        fixed_added = (
            f"{r.fixed_p50_ms - ref.fixed_p50_ms:+.2f} / {r.fixed_p99_ms - ref.fixed_p99_ms:+.2f}"
            if ref
            else "-"
        )
        added = (
            f"{r.open_p50_ms - ref.open_p50_ms:+.2f} / {r.open_p99_ms - ref.open_p99_ms:+.2f}"
            if ref
            else "-"
        )
        trips = f"{r.redis_trips:.2f}" if r.redis_trips >= 0 else "-"
        redis_cpu = f"{r.redis_cpu_us:.0f}" if r.redis_cpu_us >= 0 else "-"
        lines.append(
            f"| {r.topology} | {r.workers} | {r.scenario} | {r.rps:.0f} | {share} | "
            f"{r.cpu_us:.0f} | {r.envoy_cpu_us:.0f} | {r.ratio:.2f} | {trips} | {redis_cpu} | "
            f"{r.fixed_p50_ms:.2f} / {r.fixed_p99_ms:.2f} | {fixed_added} | {r.rate:.0f} | "
            f"{r.open_p50_ms:.2f} / {r.open_p99_ms:.2f} | {added} | {r.statuses} |"
        )
    return lines


def report(rows: list[Row], command: str, seconds: float, store: str, fixed_rate: float) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Command: `{command}` ({seconds:g} s per measurement, after a 0.5 s warm-up); sidecar"
        f" store: {store}. Written by the harness; `bench/notes.md` is appended unchanged.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python"
        f" {platform.python_version()}, {platform.platform()}. Everything (load generator, Envoy"
        " with --concurrency 2, sidecar, model simulator, Redis) runs on the same machine, so"
        " absolute throughput is a lower bound; the sidecar's own CPU per request and the ratios"
        " are what carry over.",
        "",
        "**Issue #17's goals**, from the rows below: (a) the sidecar's CPU for a JSON request is"
        " at most Envoy's for the same requests; (b) the sidecar's CPU per extra streamed chunk is"
        f" at most a quarter of Envoy's. Per chunk is the difference between the paced streams of"
        f" {LONG_STREAM} and {SHORT_STREAM} tokens (one chunk each), divided by"
        f" {LONG_STREAM - SHORT_STREAM}. CPU is read from /proc for the same requests in one run;"
        " the machine is shared, so a ratio near a bound is worth a second run.",
        "",
        *goals_table(goals(rows)),
        "",
        "Columns: closed-loop throughput and its share of Envoy alone; sidecar CPU (user + system,"
        " all workers, warm-up included in both CPU and request count) per request; Envoy CPU per"
        " request and the ratio of the two; Redis round trips and Redis CPU per request; open-loop latency"
        " (0 when skipped with --no-latency; measured from each request's"
        " scheduled send time, so queueing counts) at a modest rate every topology sustains, and"
        " at half Envoy alone's throughput, with what each adds over Envoy alone at the same"
        " rate.",
        "",
        *table(rows, fixed_rate),
        "",
    ]
    notes = Path(__file__).resolve().parent / "notes.md"
    if notes.exists():
        lines += [notes.read_text()]
    return "\n".join(lines)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through every LocalStack, which stops its processes


def main() -> int:
    # Stopped from outside (SIGTERM, or SIGINT to a run started in the background, where the shell
    # ignores it): stop every process the run started before leaving.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    parser = argparse.ArgumentParser(description="Benchmark the local stack; write a report.")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--workers", default="1,2", help="sidecar worker counts, e.g. 1,2")
    parser.add_argument(
        "--topologies", default=",".join(TOPOLOGIES), help="comma-separated topology names"
    )
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated")
    parser.add_argument(
        "--redis", default="auto", help="auto (start one if installed), on, off, or a redis:// URL"
    )
    parser.add_argument("--rate", type=float, default=200.0, help="fixed open-loop rate, req/s")
    parser.add_argument(
        "--no-floor", action="store_true", help="skip the do-nothing gRPC server measurements"
    )
    parser.add_argument(
        "--no-latency", action="store_true", help="skip the open-loop latency runs (CPU only)"
    )
    parser.add_argument(
        "--before",
        metavar="DIR",
        help="also run the --before-topologies with the sidecar of this checkout (e.g. a git"
        " worktree of main, protos generated), right before this tree's: a before/after in one run",
    )
    parser.add_argument(
        "--before-topologies",
        default="ext_authz + ext_proc STREAMED",
        help="comma-separated; topologies the --before checkout also has",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"iterate on the goals: {' '.join(QUICK)} --scenarios {QUICK_SCENARIOS}"
        " (explicit options still apply)",
    )
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    argv = sys.argv[1:]
    if "--quick" in argv:
        given = [a for a in argv if a != "--quick"]
        preset = [] if "--scenarios" in given else ["--scenarios", QUICK_SCENARIOS]
        argv = [*QUICK, *preset, *given]
    args = parser.parse_args(argv)
    rows: list[Row] = []
    names = [t.strip() for t in args.topologies.split(",")]
    scenarios = [SCENARIOS[s.strip()] for s in args.scenarios.split(",")]
    store = "memory://"
    try:
        with redis_server(args.redis) as (store_url, redis):
            store = "Redis (a local redis-server)" if redis else store
            run(args, names, scenarios, rows, store_url, redis)
    finally:  # a run cut short still reports what it measured
        argv_text = shlex.join(sys.argv[1:])
        command = "make bench" if len(sys.argv) == 1 else f"python -m bench {argv_text}"
        out = Path(args.out)
        carried = sections.kept(out)  # e.g. bench.usage_api's section: not this run's to drop
        out.write_text("\n".join([report(rows, command, args.seconds, store, args.rate), *carried]))
        print("\n".join(goals_table(goals(rows))))
        print(f"wrote {args.out}")
    return 0


def run(
    args: argparse.Namespace,
    names: list[str],
    scenarios: list[Scenario],
    rows: list[Row],
    store_url: str,
    redis: RedisCounter | None,
) -> None:
    """Every topology and worker count (and its floor, and its --before run), into ``rows``."""
    base_rates: dict[str, float] = {}
    before = Path(args.before).resolve() if args.before else None

    def one(name: str, workers: int, **options: Any) -> list[Row]:
        return measure(
            name,
            workers,
            args.seconds,
            base_rates,
            scenarios,
            store_url,
            redis,
            args.rate,
            latency=not args.no_latency,
            **options,
        )

    for name in names:
        alone = TOPOLOGIES[name] == "envoy"
        counts = [1] if alone else [int(w) for w in args.workers.split(",")]
        for workers in counts:
            if before is not None and name in args.before_topologies.split(","):
                rows += one(name, workers, source=before)
            rows += one(name, workers)
            time.sleep(0.5)
        if not alone and not args.no_floor:
            rows += one(name, 1, floor=True)


if __name__ == "__main__":
    sys.exit(main())
