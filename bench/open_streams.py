"""CPU while streams are open and nobody starts a new one: ``python -m bench.open_streams``.

Issue #17's goal (b) is read from the difference of two paced stream lengths, per request: it
also carries whatever else changes with the request rate (fewer Redis commands share a pipelined
write when fewer requests arrive a second). This measures the per-chunk cost directly: start
``--streams`` paced streams in a layout, wait until all are under way, then read the sidecar's
and Envoy's CPU over ``--seconds`` while only chunks flow (no request begins or ends), and divide
by the chunks the simulator sent meanwhile (``--streams`` × 1000 / ``--delay-ms`` a second).
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import cast

import httpx

from bench.__main__ import process_tree_cpu_s
from extproc.stack import LocalStack, Topology

KEY = "demo-enterprise-key"  # unlimited: no window refuses a stream
CHAT = "/llm/facebook-opt-125m-simulated/v1/chat/completions"


def _stream(url: str, tokens: int, delay_ms: int) -> None:
    body = {
        "model": "sim-model",
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "Say something short about gateways."}],
    }
    headers = {"authorization": f"Bearer {KEY}", "x-sim-delay-ms": str(delay_ms)}
    with httpx.stream("POST", url + CHAT, json=body, headers=headers, timeout=120) as response:
        for _ in response.iter_raw():
            pass


def measure(topology: Topology, streams: int, seconds: float, delay_ms: int) -> str:
    tokens = int((seconds + 3) * 1000 / delay_ms)  # every stream outlasts the measurement
    with LocalStack(topology=topology) as stack:
        time.sleep(1.0)
        threads = [
            threading.Thread(target=_stream, args=(stack.url, tokens, delay_ms))
            for _ in range(streams)
        ]
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # every stream admitted and under way
        sidecar, envoy = stack.procs["sidecar"].pid, stack.procs["envoy"].pid
        sidecar_s, envoy_s = process_tree_cpu_s(sidecar), process_tree_cpu_s(envoy)
        time.sleep(seconds)
        sidecar_s = process_tree_cpu_s(sidecar) - sidecar_s
        envoy_s = process_tree_cpu_s(envoy) - envoy_s
        for thread in threads:
            thread.join()
    chunks = streams * seconds * 1000 / delay_ms
    return (
        f"{topology:10} {streams} open streams, {chunks / seconds:.0f} chunks/s: "
        f"sidecar {sidecar_s / chunks * 1e6:6.1f} µs/chunk, Envoy {envoy_s / chunks * 1e6:6.1f}"
        f" µs/chunk (CPU read from /proc in 10 ms ticks)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topologies", default="lean,full", help="comma-separated layouts")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--delay-ms", type=int, default=20, help="between two chunks")
    args = parser.parse_args()
    for name in args.topologies.split(","):
        topology = cast(Topology, name.strip())
        print(measure(topology, args.streams, args.seconds, args.delay_ms), flush=True)


if __name__ == "__main__":
    main()
