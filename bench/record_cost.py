"""CPU per settled charge of the metrics recording (issue #16): ``python -m bench.record_cost``.

In process, no sockets: ``Metrics.charged`` with its token-kind and cost part, that part alone,
``GenAiTelemetry.submit`` (the gen_ai running totals), and for comparison the same eight
measurements through the OpenTelemetry SDK's own instruments. Best of ``--repeat`` runs of
``--number`` calls each, timed in this process's CPU time (the machine is shared: wall time
would count the waits for a core; the minimum is the least disturbed run).
"""

from __future__ import annotations

import argparse
import time
import timeit
from collections.abc import Callable

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, InMemoryMetricReader
from opentelemetry.sdk.resources import Resource

from extproc.domain import Charge, Usage
from extproc.observability.metrics import Metrics
from extproc.observability.model_labels import ModelLabels
from extproc.observability.telemetry import TOKEN_BUCKETS, USAGE_COUNTERS, GenAiTelemetry

USAGE = Usage(
    prompt_tokens=100, completion_tokens=50, total_tokens=150, cached_tokens=30, reasoning_tokens=20
)
CHARGE = Charge(
    "alice",
    "free",
    "m",
    USAGE,
    path="/v1/chat/completions",
    cost_micros=5,
    priced=True,
    duration_ms=1500,
)


def sdk_instruments() -> Callable[[], None]:
    """The eight gen_ai measurements of one charge through the SDK's synchronous instruments."""
    meter = MeterProvider(metric_readers=[InMemoryMetricReader()]).get_meter("bench")
    histogram = meter.create_histogram(
        "gen_ai.client.token.usage",
        unit="{token}",
        explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
    )
    counters = [meter.create_counter(name, unit="{token}") for name, _, _ in USAGE_COUNTERS]
    duration = meter.create_histogram("gen_ai.server.request.duration", unit="s")
    common = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "m",
        "maas.tier": "free",
    }
    by_type = [{**common, "gen_ai.token.type": t} for t in ("input", "output")]
    usage_attributes = {**common, "gen_ai.token.modality": "unknown"}
    amounts = (100, 50, 30, 0, 20)

    def record() -> None:
        histogram.record(100, by_type[0])
        histogram.record(50, by_type[1])
        for counter, amount in zip(counters, amounts, strict=True):
            if amount:
                counter.add(amount, usage_attributes)
        duration.record(1.5, common)

    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--number", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    models = ModelLabels(["m"])
    metrics = Metrics(models=models)
    telemetry = GenAiTelemetry(ConsoleMetricExporter(), Resource.create({}), models)
    cases: list[tuple[str, Callable[[], None]]] = [
        ("Metrics.charged (all Prometheus metrics of a charge)", lambda: metrics.charged(CHARGE)),
        (
            "  of which token kinds + cost",
            lambda: metrics._kinds_and_cost(CHARGE, ("free", "m")),
        ),
        ("GenAiTelemetry.submit (gen_ai running totals)", lambda: telemetry.submit(CHARGE)),
        ("the same through the SDK's instruments", sdk_instruments()),
    ]
    print("| recording | µs per charge |\n|---|---|")
    for name, call in cases:
        call()
        runs = timeit.repeat(call, timer=time.process_time, number=args.number, repeat=args.repeat)
        best = min(runs) / args.number
        print(f"| {name} | {best * 1e6:.1f} |")


if __name__ == "__main__":
    main()
