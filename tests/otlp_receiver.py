"""An OTLP metrics receiver on loopback (OTLP/HTTP and OTLP/gRPC) that keeps what it is sent.

Written from the upstream wire format, not from our exporter code: the request and response
messages are opentelemetry-proto's (open-telemetry/opentelemetry-proto,
``opentelemetry/proto/collector/metrics/v1/metrics_service.proto`` at
e6aeaf89b821ff5a147f12116b85fd3e13841778, generated in the ``opentelemetry-proto`` package),
and the HTTP binding follows
``docs/specification.md`` (at d3b7479dd9085f8b761ab41cd0b204975d2b8138): ``POST /v1/metrics`` with
``Content-Type: application/x-protobuf`` (optionally gzip-encoded), answered ``200`` with an
``ExportMetricsServiceResponse`` of the same content type.

Totals: the SDK exports cumulative points, so for each (exporting instance, metric, attribute
set) the latest point holds the running total; ``totals`` adds those up over instances.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Mapping
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as ms
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as ms_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs if isinstance(kv, KeyValue)}


@dataclass(frozen=True)
class Point:
    """One exported data point, flattened: a counter's value or a histogram's sum and count."""

    resource: Mapping[str, Any]
    scope: str
    metric: str
    unit: str
    kind: str  # "sum" or "histogram"
    attributes: Mapping[str, Any]
    time_ns: int
    value: float  # sum of a histogram, value of a counter
    count: int  # observations of a histogram (0 for a counter)
    temporality: int
    monotonic: bool
    bounds: tuple[float, ...]


class _Store:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[ms.ExportMetricsServiceRequest] = []
        self.headers: list[dict[str, str]] = []

    def add(self, request: ms.ExportMetricsServiceRequest, headers: dict[str, str]) -> None:
        with self.lock:
            self.requests.append(request)
            self.headers.append(headers)


class OtlpReceiver:
    """Both OTLP transports on free loopback ports; ``with OtlpReceiver() as r`` stops them."""

    def __init__(self) -> None:
        self._store = _Store()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self._store))
        self._http_thread = threading.Thread(
            target=self._http.serve_forever, args=(0.05,), daemon=True
        )
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        ms_grpc.add_MetricsServiceServicer_to_server(_Servicer(self._store), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    @property
    def grpc_url(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    def __enter__(self) -> OtlpReceiver:
        self._http_thread.start()
        self._grpc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._grpc.stop(0).wait()

    @property
    def headers(self) -> list[dict[str, str]]:
        with self._store.lock:
            return list(self._store.headers)

    def points(self, metric: str | None = None) -> list[Point]:
        with self._store.lock:
            requests = list(self._store.requests)
        found = []
        for request in requests:
            for rm in request.resource_metrics:
                resource = attributes(rm.resource.attributes)
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        if metric is None or m.name == metric:
                            found += _flatten(resource, sm.scope.name, m)
        return found

    def totals(self, metric: str, *keys: str) -> dict[tuple[Any, ...], tuple[float, int]]:
        """(sum, count) of ``metric`` by the values of attributes ``keys``, over instances."""
        latest: dict[tuple[Any, ...], Point] = {}
        for point in self.points(metric):
            series = (
                point.resource.get("service.instance.id"),
                tuple(sorted(point.attributes.items())),
            )
            if series not in latest or latest[series].time_ns <= point.time_ns:
                latest[series] = point
        out: dict[tuple[Any, ...], tuple[float, int]] = {}
        for point in latest.values():
            key = tuple(point.attributes.get(k) for k in keys)
            value, count = out.get(key, (0.0, 0))
            out[key] = (value + point.value, count + point.count)
        return out


def _flatten(resource: dict[str, Any], scope: str, m: metrics_pb2.Metric) -> list[Point]:
    kind = m.WhichOneof("data")
    out = []
    if kind == "sum":
        for dp in m.sum.data_points:
            value = dp.as_int if dp.WhichOneof("value") == "as_int" else dp.as_double
            out.append(
                Point(
                    resource, scope, m.name, m.unit, "sum", attributes(dp.attributes),
                    dp.time_unix_nano, value, 0, m.sum.aggregation_temporality,
                    m.sum.is_monotonic, (),
                )
            )  # fmt: skip
    elif kind == "histogram":
        for hp in m.histogram.data_points:
            out.append(
                Point(
                    resource, scope, m.name, m.unit, "histogram", attributes(hp.attributes),
                    hp.time_unix_nano, hp.sum, hp.count, m.histogram.aggregation_temporality,
                    False, tuple(hp.explicit_bounds),
                )
            )  # fmt: skip
    return out


class _Servicer(ms_grpc.MetricsServiceServicer):  # type: ignore[misc]
    def __init__(self, store: _Store) -> None:
        self._store = store

    def Export(  # noqa: N802 - the service's method name
        self, request: ms.ExportMetricsServiceRequest, context: grpc.ServicerContext
    ) -> ms.ExportMetricsServiceResponse:
        self._store.add(request, {k: v for k, v in context.invocation_metadata()})
        return ms.ExportMetricsServiceResponse()


def _handler(store: _Store) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.path != "/v1/metrics":
                self._answer(404, b"")
                return
            if self.headers.get("Content-Type") != "application/x-protobuf":
                self._answer(415, b"")
                return
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            request = ms.ExportMetricsServiceRequest()
            try:
                request.ParseFromString(body)
            except Exception:
                self._answer(400, b"")
                return
            store.add(request, {k.lower(): v for k, v in self.headers.items()})
            self._answer(200, ms.ExportMetricsServiceResponse().SerializeToString())

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
