"""`make bench`: load the local stack in each topology and write docs/benchmarks.md.

For every topology (Envoy alone, ext_authz only, ext_authz + ext_proc STREAMED, ext_authz +
ext_proc observability mode) and sidecar worker count, and every scenario (JSON, fast SSE, paced
SSE of ~50 chunks, denial), it measures in one run on this machine:
- closed-loop throughput, and its ratio to Envoy alone;
- sidecar CPU per request (utime + stime from /proc, all worker processes);
- latency at a fixed offered rate (open loop; half of Envoy alone's closed-loop rate), p50/p99,
  and what the sidecar adds over Envoy alone at the same rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extproc.stack import LocalStack, Topology

ROOT = Path(__file__).resolve().parent.parent
CONFIG = Path(__file__).resolve().parent / "config.yaml"
CHAT = "/llm/facebook-opt-125m-simulated/v1/chat/completions"
KEY = "demo-enterprise-key"
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


SCENARIOS = {
    "json": Scenario("json", {"model": "sim-model", "max_tokens": 16, "messages": _messages()}),
    "sse": Scenario(
        "sse",
        {
            "model": "sim-model",
            "max_tokens": 16,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": _messages(),
        },
    ),
    "sse-paced-50": Scenario(
        "sse-paced-50",
        {
            "model": "sim-model",
            "max_tokens": 50,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": _messages(),
        },
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
    rate: float = 0.0
    open_p50_ms: float = 0.0
    open_p99_ms: float = 0.0
    errors: int = 0
    statuses: str = ""


def measure(
    topology_name: str, workers: int, seconds: float, base_rates: dict[str, float]
) -> list[Row]:
    topology = TOPOLOGIES[topology_name]
    rows = []
    stack = LocalStack(config_path=CONFIG, workers=workers, topology=topology)
    with stack:
        sidecar = stack.procs.get("sidecar")
        envoy = stack.procs["envoy"]
        for scenario in SCENARIOS.values():
            if topology == "envoy" and scenario.name == "denied":
                continue
            before = process_tree_cpu_s(sidecar.pid) if sidecar else 0.0
            envoy_before = process_tree_cpu_s(envoy.pid)
            closed = load(stack.listen_port, scenario, seconds)
            cpu = (process_tree_cpu_s(sidecar.pid) - before) if sidecar else 0.0
            envoy_cpu = process_tree_cpu_s(envoy.pid) - envoy_before
            total = max(1, closed["requests"] + closed["errors"])
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
            if topology == "envoy":
                base_rates[scenario.name] = closed["rps"]
            rate = base_rates.get(scenario.name, closed["rps"]) / 2
            opened = load(stack.listen_port, scenario, seconds, rate=rate)
            row.rate, row.open_p50_ms, row.open_p99_ms = rate, opened["p50_ms"], opened["p99_ms"]
            rows.append(row)
            print(
                f"{topology_name:36} w={workers} {scenario.name:13} {row.rps:8.0f} rps "
                f"cpu {row.cpu_us:6.0f} us/req  open@{rate:.0f}/s p50 {row.open_p50_ms:.2f} "
                f"p99 {row.open_p99_ms:.2f} ms  [{row.statuses}]",
                flush=True,
            )
    return rows


def report(rows: list[Row], command: str, seconds: float) -> str:
    base = {r.scenario: r for r in rows if r.topology == "envoy alone"}
    lines = [
        "# Benchmarks",
        "",
        f"Command: `{command}` ({seconds:g} s per measurement, after a 0.5 s warm-up).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()},"
        f" {platform.platform()}. Everything (load generator, Envoy with --concurrency 2, sidecar,"
        " model simulator) runs on the same machine, so absolute numbers are lower bounds; the"
        " ratios and the sidecar's own CPU per request are what carry over.",
        "",
        "Columns: closed-loop throughput and its share of Envoy alone; sidecar CPU (user + system,"
        " all workers) per request; Envoy CPU per request; latency at a fixed offered rate of half"
        " Envoy alone's throughput (open loop), and the p50/p99 added over Envoy alone at that"
        " rate.",
        "",
        "| topology | workers | scenario | rps | vs Envoy | sidecar CPU µs/req | Envoy CPU µs/req"
        " | rate/s | p50 ms | p99 ms | added p50 ms | added p99 ms | statuses |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = base.get(r.scenario)
        share = f"{r.rps / ref.rps:.2f}" if ref and ref.rps else "-"
        added50 = f"{r.open_p50_ms - ref.open_p50_ms:+.2f}" if ref else "-"
        added99 = f"{r.open_p99_ms - ref.open_p99_ms:+.2f}" if ref else "-"
        lines.append(
            f"| {r.topology} | {r.workers} | {r.scenario} | {r.rps:.0f} | {share} | "
            f"{r.cpu_us:.0f} | {r.envoy_cpu_us:.0f} | {r.rate:.0f} | {r.open_p50_ms:.2f} | "
            f"{r.open_p99_ms:.2f} | {added50} | {added99} | {r.statuses} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description="Benchmark the local stack; write a report.")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--workers", default="1,2", help="sidecar worker counts, e.g. 1,2")
    parser.add_argument(
        "--topologies", default=",".join(TOPOLOGIES), help="comma-separated topology names"
    )
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    rows: list[Row] = []
    base_rates: dict[str, float] = {}
    names = [t.strip() for t in args.topologies.split(",")]
    for name in names:
        counts = [1] if TOPOLOGIES[name] == "envoy" else [int(w) for w in args.workers.split(",")]
        for workers in counts:
            rows.extend(measure(name, workers, args.seconds, base_rates))
            time.sleep(0.5)
    command = "make bench" if len(sys.argv) == 1 else "python -m bench " + " ".join(sys.argv[1:])
    Path(args.out).write_text(report(rows, command, args.seconds))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
