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
- ``gen_ai.server.request.duration`` (histogram, ``s``, the semconv's buckets): from the
  request's headers to the response's last byte as the gateway saw it (``Charge.duration_ms``),
  with ``error.type`` for a failed one; the gateway is the server its clients call (as Envoy AI
  Gateway records this metric). Charges whose duration was not measured are left out.

Attributes: ``gen_ai.operation.name`` and ``gen_ai.provider.name`` from the API schema of the
path, ``gen_ai.request.model`` the bounded ``model`` label of the Prometheus metrics
(observability/model_labels.py: clients pick the model string), and ``maas.tier`` or
``maas.subscription``. The response model and the server address are not known to the sidecar.

Why the running totals are kept here and not in the SDK's instruments: an SDK ``record`` or
``add`` validates and hashes its attributes on every call, 7-15 µs each (eight per charge); the
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
    from opentelemetry.sdk.metrics.export import HistogramDataPoint, MetricExporter, MetricsData
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
REQUEST_DURATION = "gen_ai.server.request.duration"
# gen-ai-metrics.md, gen_ai.server.request.duration: "SHOULD be specified with ExplicitBucketBoundaries"
DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
MAX_SERIES = 2000  # attribute sets kept (the SDK's default cardinality limit); then "overflow"
_OVERFLOW = ("", "", "", "")  # the key of the overflow attribute set


def operation_of(path: str) -> tuple[str, str]:
    """``(gen_ai.operation.name, gen_ai.provider.name)`` of a request path, by its API suffix."""
    route = path.split("?", 1)[0].rstrip("/")
    for suffix, operation, provider in OPERATIONS:
        if route.endswith(suffix):
            return operation, provider
    return OTHER_OPERATION


# A histogram's running totals live in a flat list, [count, sum, min, max, *bucket counts], and
# a series' in one list: the export copies each series with one list() while the settles wait.
_HEAD = 4  # count, sum, min, max


def _histogram_size(bounds: tuple[float, ...]) -> int:
    return _HEAD + len(bounds) + 1


def _observe(values: list[float], at: int, bounds: tuple[float, ...], value: float) -> None:
    """Add ``value`` to the histogram at ``values[at:]`` (OTLP's explicit buckets hold
    (bounds[i-1], bounds[i]])."""
    if values[at]:
        values[at + 2] = min(values[at + 2], value)
        values[at + 3] = max(values[at + 3], value)
    else:
        values[at + 2] = values[at + 3] = value
    values[at] += 1
    values[at + 1] += value
    values[at + _HEAD + bisect.bisect_left(bounds, value)] += 1


def _point(
    values: list[float], at: int, bounds: tuple[float, ...], attributes: dict[str, Any],
    start_ns: int, now_ns: int,
) -> HistogramDataPoint:  # fmt: skip
    from opentelemetry.sdk.metrics.export import HistogramDataPoint

    count, total, low, high = values[at : at + _HEAD]
    return HistogramDataPoint(
        attributes=attributes,
        start_time_unix_nano=start_ns,
        time_unix_nano=now_ns,
        count=int(count),
        sum=total,
        bucket_counts=[int(n) for n in values[at + _HEAD : at + _histogram_size(bounds)]],
        explicit_bounds=bounds,
        min=low,
        max=high,
    )


# A token series: one histogram per TOKEN_TYPES, then the USAGE_COUNTERS.
_TOKEN_HISTOGRAM = _histogram_size(TOKEN_BUCKETS)
_COUNTERS_AT = _TOKEN_HISTOGRAM * len(TOKEN_TYPES)
_TOKEN_SERIES = _COUNTERS_AT + len(USAGE_COUNTERS)
_DURATION_SERIES = _histogram_size(DURATION_BUCKETS)


def error_type(charge: Charge) -> str:
    """``error.type`` of a charge: the upstream's 4xx/5xx status, ``_OTHER`` for a stream that
    ended before any response headers, "" for a success."""
    if 400 <= charge.status <= 599:
        return str(charge.status)
    return "_OTHER" if charge.status == 0 else ""


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
        # attribute key -> (start time, the series' flat totals)
        self._tokens: dict[tuple[str, ...], tuple[int, list[float]]] = {}
        self._durations: dict[tuple[str, ...], tuple[int, list[float]]] = {}
        self._stop = threading.Event()
        self._export_lock = threading.Lock()  # one export at a time (the thread, a flush)
        self._thread: threading.Thread | None = None
        self.failures = 0  # charges not recorded (a bug: logged once)
        self.exports_failed = 0

    # --- the settle path --------------------------------------------------------------------

    def submit(self, charge: Charge) -> None:
        """Add ``charge`` to the totals. Never raises."""
        try:
            self._record(charge)
        except Exception as exc:  # telemetry must never cost a settle its Kuadrant report
            self.failures += 1
            if self.failures == 1:
                log.error("gen_ai metrics not recorded: %s (logged once)", type(exc).__name__)

    def _record(self, charge: Charge) -> None:
        usage = charge.usage
        model = self._models.label(charge.model, charge.path, subscribed=bool(charge.subscription))
        key = (*operation_of(charge.path), model, charge.plan)  # the path itself is unbounded
        with self._lock:
            if charge.duration_ms:
                timed = (*key, error_type(charge))
                duration = self._durations.get(timed) or self._new(
                    self._durations, timed, _DURATION_SERIES
                )
                _observe(duration[1], 0, DURATION_BUCKETS, charge.duration_ms / 1000)
            # No usage at all (none reported, none estimated): "it MUST NOT report usage metric".
            if not (usage.reported or usage.estimated):
                return
            kinds = split(usage)
            tokens_in = kinds["input"] + kinds["cached_input"] + kinds["cache_creation"]
            tokens_out = kinds["output"] + kinds["reasoning"]
            values = (self._tokens.get(key) or self._new(self._tokens, key, _TOKEN_SERIES))[1]
            # A part is observed when it is known: reported (0 included) or counted.
            if tokens_in or usage.prompt_tokens is not None:
                _observe(values, 0, TOKEN_BUCKETS, tokens_in)
            if tokens_out or usage.completion_tokens is not None:
                _observe(values, _TOKEN_HISTOGRAM, TOKEN_BUCKETS, tokens_out)
            at = _COUNTERS_AT  # USAGE_COUNTERS, in order
            values[at] += tokens_in
            values[at + 1] += tokens_out
            values[at + 2] += kinds["cached_input"]
            values[at + 3] += kinds["cache_creation"]
            values[at + 4] += kinds["reasoning"]

    def _new(
        self,
        series: dict[tuple[str, ...], tuple[int, list[float]]],
        key: tuple[str, ...],
        size: int,
    ) -> tuple[int, list[float]]:
        """A new series of ``size`` totals; past MAX_SERIES attribute sets, the overflow one."""
        if len(series) >= MAX_SERIES:
            key = _OVERFLOW + key[len(_OVERFLOW) :]
            if key in series:
                return series[key]
            log.warning("gen_ai metrics: %d attribute sets; later ones overflow", MAX_SERIES)
        new = series[key] = (self._clock_ns(), [0] * size)  # ints: token totals stay exact
        return new

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
            Metric,
            MetricsData,
            NumberDataPoint,
            ResourceMetrics,
            ScopeMetrics,
            Sum,
        )
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        from extproc import __version__

        with self._lock:  # one list() per series: the settles (on the event loop) wait
            tokens = [(key, start, list(values)) for key, (start, values) in self._tokens.items()]
            timed = [(key, start, list(values)) for key, (start, values) in self._durations.items()]
        now = self._clock_ns()
        points: list[HistogramDataPoint] = []
        durations: list[HistogramDataPoint] = []
        sums: list[list[NumberDataPoint]] = [[] for _ in USAGE_COUNTERS]
        for key, start, values in tokens:
            common = self._attributes(key)
            for i, token_type in enumerate(TOKEN_TYPES):
                at = i * _TOKEN_HISTOGRAM
                if values[at]:
                    attributes = {**common, "gen_ai.token.type": token_type}
                    points.append(_point(values, at, TOKEN_BUCKETS, attributes, start, now))
            usage_attributes = {**common, "gen_ai.token.modality": "unknown"}
            for i, value in enumerate(values[_COUNTERS_AT:]):
                if value:
                    sums[i].append(NumberDataPoint(usage_attributes, start, now, int(value)))
        for key, start, values in timed:
            attributes = self._attributes(key[:4])
            if key[4]:
                attributes["error.type"] = key[4]
            durations.append(_point(values, 0, DURATION_BUCKETS, attributes, start, now))
        if not (points or durations):
            return None
        cumulative = AggregationTemporality.CUMULATIVE
        metrics = []
        if points:
            data = Histogram(data_points=points, aggregation_temporality=cumulative)
            metrics.append(
                Metric(TOKEN_USAGE, "Number of input and output tokens used.", "{token}", data)
            )
        for (name, description, _), data_points in zip(USAGE_COUNTERS, sums, strict=True):
            if data_points:
                counted = Sum(data_points, aggregation_temporality=cumulative, is_monotonic=True)
                metrics.append(Metric(name, description, "{token}", counted))
        if durations:
            data = Histogram(data_points=durations, aggregation_temporality=cumulative)
            description = "Generative AI server request duration such as time-to-last byte."
            metrics.append(Metric(REQUEST_DURATION, description, "s", data))
        scope = InstrumentationScope("maas-extproc", __version__)
        return MetricsData(
            [ResourceMetrics(self._resource, [ScopeMetrics(scope, metrics, "")], "")]
        )

    def _attributes(self, key: tuple[str, ...]) -> dict[str, Any]:
        if key[:4] == _OVERFLOW:
            return {"otel.metric.overflow": True}
        operation, provider, model, plan = key[:4]
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
