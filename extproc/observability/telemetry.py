"""OpenTelemetry ``gen_ai`` metrics of every settled charge, pushed over OTLP in the background.

Names, units, buckets and attributes follow the GenAI semantic conventions
(open-telemetry/semantic-conventions-genai, ``docs/gen-ai/gen-ai-metrics.md`` at 004902b8 and
``docs/gen-ai/gen-ai-token-metrics.md`` at 066d4a7f, both status "Development"):

- ``gen_ai.client.token.usage`` (histogram, ``{token}``, the semconv's buckets): per charge one
  ``input`` and one ``output`` observation. ``gen_ai.token.type`` has two well-known values and
  "if one of them applies, the respective value MUST be used": cached and cache-written tokens
  are input tokens, reasoning tokens are output tokens, so ``input`` + ``output`` is the charged
  total. The sidecar reads usage as a client of the model server (as Envoy AI Gateway records
  this metric) and reports the billable tokens, estimates included.
- ``gen_ai.client.inference.usage.{input_tokens, output_tokens, cache_read.input_tokens,
  cache_write.input_tokens, reasoning.output_tokens}`` (monotonic counters, ``{token}``): the
  newer per-kind usage counters, the last three subsets of the first two: where the token kinds
  live. ``gen_ai.token.modality`` is ``unknown``: no schema read here splits usage by modality.

Attributes: ``gen_ai.operation.name`` and ``gen_ai.provider.name`` from the API schema of the
path, ``gen_ai.request.model`` the bounded ``model`` label of the Prometheus metrics
(observability/model_labels.py: clients pick the model string), and ``maas.tier`` or
``maas.subscription``. The response model and the server address are not known to the sidecar.

Why the running totals are kept here and not in the SDK's instruments: an SDK ``record`` or
``add`` validates and hashes its attributes on every call, 7-15 µs each (seven per charge); the
totals below cost a dictionary lookup and a few additions per charge. They are handed to the
SDK's own OTLP exporter, as the SDK's own data-model objects, from a thread of its own: nothing
is exported on the request path.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from extproc.accounting.pricing import split
from extproc.config import TelemetryConfig, redact_url
from extproc.domain import Charge
from extproc.observability.model_labels import ModelLabels

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricsData
    from opentelemetry.sdk.resources import Resource

log = logging.getLogger("extproc.telemetry")

TOKEN_USAGE = "gen_ai.client.token.usage"
# gen-ai-metrics.md: "This metric SHOULD be specified with ExplicitBucketBoundaries of ..."
TOKEN_BUCKETS = (
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0,
    4194304.0, 16777216.0, 67108864.0,
)  # fmt: skip

# (path suffix, gen_ai.operation.name, gen_ai.provider.name): the API schema the sidecar read.
# The provider is the format flavour (the semconv's own words), not the backend behind the route.
OPERATIONS = (
    ("/v1/chat/completions", "chat", "openai"),
    ("/v1/completions", "text_completion", "openai"),
    ("/v1/embeddings", "embeddings", "openai"),
    ("/v1/responses", "chat", "openai"),
    ("/v1/messages", "chat", "anthropic"),
)
OTHER_OPERATION = ("other", "openai")  # a configured charged suffix of no known schema

# Each usage counter: its name, description and the parts of pricing.split it adds up (the
# settle path adds them up in this order, written out: ``GenAiTelemetry._record``).
USAGE_COUNTERS = (
    (
        "gen_ai.client.inference.usage.input_tokens",
        "The number of input (prompt) tokens used, including cached tokens.",
        ("input", "cached_input", "cache_creation"),
    ),
    (
        "gen_ai.client.inference.usage.output_tokens",
        "The number of output (completion) tokens used, including reasoning tokens.",
        ("output", "reasoning"),
    ),
    (
        "gen_ai.client.inference.usage.cache_read.input_tokens",
        "The number of input tokens read from a provider-managed cache.",
        ("cached_input",),
    ),
    (
        "gen_ai.client.inference.usage.cache_write.input_tokens",
        "The number of input tokens written to a provider-managed cache.",
        ("cache_creation",),
    ),
    (
        "gen_ai.client.inference.usage.reasoning.output_tokens",
        "The number of output tokens used for reasoning.",
        ("reasoning",),
    ),
)
TOKEN_TYPES = ("input", "output")
MAX_SERIES = 2000  # attribute sets kept (the SDK's default cardinality limit); then "overflow"
_OVERFLOW = ("", "", "", "")  # the key of the overflow attribute set


def operation_of(path: str) -> tuple[str, str]:
    """``(gen_ai.operation.name, gen_ai.provider.name)`` of a request path, by its API suffix."""
    route = path.split("?", 1)[0].rstrip("/")
    for suffix, operation, provider in OPERATIONS:
        if route.endswith(suffix):
            return operation, provider
    return OTHER_OPERATION


class _Series:
    """The running totals of one attribute set: two histograms and the usage counters."""

    __slots__ = ("buckets", "count", "counters", "max", "min", "start_ns", "sum")

    def __init__(self, start_ns: int) -> None:
        self.start_ns = start_ns
        self.count = [0, 0]  # per TOKEN_TYPES
        self.sum = [0, 0]
        self.min = [0, 0]
        self.max = [0, 0]
        self.buckets = [[0] * (len(TOKEN_BUCKETS) + 1) for _ in TOKEN_TYPES]
        self.counters = [0] * len(USAGE_COUNTERS)

    def observe(self, index: int, value: int) -> None:
        count = self.count[index]
        self.min[index] = value if not count else min(self.min[index], value)
        self.max[index] = value if not count else max(self.max[index], value)
        self.count[index] = count + 1
        self.sum[index] += value
        # Explicit buckets are upper-inclusive: (b[i-1], b[i]].
        self.buckets[index][bisect.bisect_left(TOKEN_BUCKETS, value)] += 1


class GenAiTelemetry:
    """Running ``gen_ai`` totals of the settled charges (a ``ChargeSink`` of the charger), and
    the thread that exports them every ``interval_s``."""

    def __init__(
        self,
        exporter: MetricExporter,
        resource: Resource,
        models: ModelLabels,
        *,
        era: str = "tiers",
        interval_s: float = 30.0,
        timeout_s: float = 10.0,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._exporter = exporter
        self._resource = resource
        self._models = models
        self._plan_key = "maas.tier" if era == "tiers" else "maas.subscription"
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._clock_ns = clock_ns
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str, str, str], _Series] = {}
        self._stop = threading.Event()
        self._export_lock = threading.Lock()  # one export at a time (the thread, a flush)
        self._thread: threading.Thread | None = None
        self.failures = 0  # charges not recorded (a bug: logged once)
        self.exports_failed = 0

    # --- the settle path --------------------------------------------------------------------

    def submit(self, charge: Charge) -> None:
        """Add ``charge`` to the totals; one without usage (none reported or estimated) is left
        out ("Otherwise it MUST NOT report usage metric"). Never raises."""
        try:
            self._record(charge)
        except Exception as exc:  # telemetry must never cost a settle its Kuadrant report
            self.failures += 1
            if self.failures == 1:
                log.error("gen_ai metrics not recorded: %s (logged once)", type(exc).__name__)

    def _record(self, charge: Charge) -> None:
        usage = charge.usage
        if not (usage.reported or usage.estimated):
            return
        model = self._models.label(charge.model, charge.path, subscribed=bool(charge.subscription))
        kinds = split(usage)
        tokens_in = kinds["input"] + kinds["cached_input"] + kinds["cache_creation"]
        tokens_out = kinds["output"] + kinds["reasoning"]
        key = (*operation_of(charge.path), model, charge.plan)  # the path itself is unbounded
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._new_series(key)
            # A part is observed when it is known: reported (0 included) or counted.
            if tokens_in or usage.prompt_tokens is not None:
                series.observe(0, tokens_in)
            if tokens_out or usage.completion_tokens is not None:
                series.observe(1, tokens_out)
            counters = series.counters  # in USAGE_COUNTERS' order
            counters[0] += tokens_in
            counters[1] += tokens_out
            counters[2] += kinds["cached_input"]
            counters[3] += kinds["cache_creation"]
            counters[4] += kinds["reasoning"]

    def _new_series(self, key: tuple[str, str, str, str]) -> _Series:
        if len(self._series) >= MAX_SERIES:
            key = _OVERFLOW
            series = self._series.get(key)
            if series is not None:
                return series
            log.warning("gen_ai metrics: %d attribute sets; later ones overflow", MAX_SERIES)
        series = self._series[key] = _Series(self._clock_ns())
        return series

    # --- the export thread ------------------------------------------------------------------

    def start(self) -> None:
        """Start exporting every ``interval_s`` from a daemon thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="otlp-metrics", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.export()

    def export(self) -> bool:
        """Export the running totals now (cumulative); False when the exporter failed."""
        from opentelemetry.sdk.metrics.export import MetricExportResult

        with self._export_lock:
            data = self.snapshot()
            if data is None:
                return True
            try:
                result = self._exporter.export(data, timeout_millis=self._timeout_s * 1000)
            except Exception as exc:  # the exporter logs its own; this one must not die
                log.warning("OTLP export failed: %s", type(exc).__name__)
                result = MetricExportResult.FAILURE
            if result is not MetricExportResult.SUCCESS:
                self.exports_failed += 1
                return False
            return True

    def shutdown(self) -> None:
        """Stop the thread, export once more, shut the exporter down (blocking: off the loop)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self._timeout_s + self._interval_s)
        self.export()
        self._exporter.shutdown(timeout_millis=self._timeout_s * 1000)

    def snapshot(self) -> MetricsData | None:
        """The totals as the SDK's data model (None before the first charge)."""
        from opentelemetry.sdk.metrics.export import (
            AggregationTemporality,
            Histogram,
            HistogramDataPoint,
            Metric,
            MetricsData,
            NumberDataPoint,
            ResourceMetrics,
            ScopeMetrics,
            Sum,
        )
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        from extproc import __version__

        now = self._clock_ns()
        with self._lock:
            copies = [
                (key, s.start_ns, list(s.count), list(s.sum), list(s.min), list(s.max),
                 [list(b) for b in s.buckets], list(s.counters))
                for key, s in self._series.items()
            ]  # fmt: skip
        if not copies:
            return None
        cumulative = AggregationTemporality.CUMULATIVE
        points: list[HistogramDataPoint] = []
        sums: list[list[NumberDataPoint]] = [[] for _ in USAGE_COUNTERS]
        for key, start, count, total, low, high, buckets, counters in copies:
            common = self._attributes(key)
            for i, token_type in enumerate(TOKEN_TYPES):
                if count[i]:
                    points.append(
                        HistogramDataPoint(
                            attributes={**common, "gen_ai.token.type": token_type},
                            start_time_unix_nano=start,
                            time_unix_nano=now,
                            count=count[i],
                            sum=total[i],
                            bucket_counts=buckets[i],
                            explicit_bounds=TOKEN_BUCKETS,
                            min=low[i],
                            max=high[i],
                        )
                    )
            usage_attributes = {**common, "gen_ai.token.modality": "unknown"}
            for i, value in enumerate(counters):
                if value:
                    sums[i].append(NumberDataPoint(usage_attributes, start, now, value))
        metrics = [
            Metric(
                TOKEN_USAGE,
                "Number of input and output tokens used.",
                "{token}",
                Histogram(data_points=points, aggregation_temporality=cumulative),
            )
        ]
        for (name, description, _), data_points in zip(USAGE_COUNTERS, sums, strict=True):
            if data_points:
                data = Sum(data_points, aggregation_temporality=cumulative, is_monotonic=True)
                metrics.append(Metric(name, description, "{token}", data))
        scope = InstrumentationScope("maas-extproc", __version__)
        return MetricsData(
            [ResourceMetrics(self._resource, [ScopeMetrics(scope, metrics, "")], "")]
        )

    def _attributes(self, key: tuple[str, str, str, str]) -> dict[str, Any]:
        if key == _OVERFLOW:
            return {"otel.metric.overflow": True}
        operation, provider, model, plan = key
        return {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": provider,
            "gen_ai.request.model": model,
            self._plan_key: plan,
        }


def build_exporter(config: TelemetryConfig) -> MetricExporter:
    """The OTLP exporter for ``telemetry.otlp``; headers left unset come from ``OTEL_*`` variables."""
    otlp = config.otlp
    headers: dict[str, str] | None = dict(otlp.headers) if otlp.headers else None
    if otlp.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcExporter,
        )

        return GrpcExporter(
            endpoint=otlp.endpoint.split("://", 1)[-1].rstrip("/"),
            insecure=not otlp.endpoint.startswith("https://"),
            headers=headers,
            timeout=otlp.timeout_s,
        )
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpExporter,
    )

    return HttpExporter(
        endpoint=metrics_url(otlp.endpoint), headers=headers, timeout=otlp.timeout_s
    )


def metrics_url(endpoint: str) -> str:
    """OTLP/HTTP's metrics URL: a base URL gets ``/v1/metrics``; a URL with a path is kept."""
    scheme, _, rest = endpoint.partition("://")
    _, slash, path = rest.partition("/")
    if slash and path.strip("/"):
        return endpoint
    return f"{scheme}://{rest.rstrip('/')}/v1/metrics"


def resource_for(config: TelemetryConfig) -> Resource:
    """service.name and the configured attributes (and OTEL_RESOURCE_ATTRIBUTES, merged by the
    SDK); each worker process gets a service.instance.id of its own, or a backend would merge
    the workers' cumulative totals into one broken series."""
    from opentelemetry.sdk.resources import Resource

    from extproc import __version__

    attributes: dict[str, str | int] = {
        "service.name": config.service_name,
        "service.version": __version__,
        "service.instance.id": str(uuid.uuid4()),
        "process.pid": os.getpid(),
    }
    attributes.update(dict(config.resource_attributes))
    return Resource.create(attributes)


def build_telemetry(
    config: TelemetryConfig, models: ModelLabels, *, era: str = "tiers"
) -> GenAiTelemetry | None:
    """The ``gen_ai`` totals and their OTLP export; None when ``telemetry.otlp.endpoint`` is
    empty (the default)."""
    otlp = config.otlp
    if not otlp.endpoint:
        return None
    telemetry = GenAiTelemetry(
        build_exporter(config),
        resource_for(config),
        models,
        era=era,
        interval_s=otlp.interval_s,
        timeout_s=otlp.timeout_s,
    )
    log.info(
        "OTLP metrics to %s (%s) every %.0fs",
        redact_url(otlp.endpoint),
        otlp.protocol,
        otlp.interval_s,
    )
    return telemetry
