"""Envoy's OpenTelemetry access log -> one charge per finished request, acknowledged once settled.

The ``accesslog`` and ``lean`` layouts report each finished request with Envoy's
``envoy.access_loggers.open_telemetry`` (deploy/local/filters.yaml ``usage_access_log``). Its
gRPC transport sends each batch as one unary
``opentelemetry.proto.collector.logs.v1.LogsService/Export`` call, retried as
``common_config.grpc_stream_retry_policy`` says (envoyproxy/envoy
``source/extensions/access_loggers/open_telemetry/grpc_access_log_impl.cc`` and
``source/extensions/access_loggers/common/grpc_access_logger_clients.h`` at a49e36ac:
``UnaryGrpcAccessLogClient``, retry options built from that policy). This handler answers only
after every charge of the batch is settled (applied by the store, or spooled for replay), so a
worker killed with a batch in hand never answers it, and Envoy sends it again to a live worker:
delivery is at least once. A settle carries the admission's request id, so a batch that arrives
twice is charged once (``maas_settle_duplicates_total``).

Each log record carries the attributes of the ``attributes`` list in filters.yaml, every one a
string as Envoy 1.40 formats them: ``authz`` (ext_authz's dynamic metadata namespace as JSON: the
billing record), ``usage`` (namespace ``maas.usage`` as JSON, written by sse_to_metadata /
json_to_metadata; ``-`` when empty), ``status``, ``flags`` (Envoy's short response flags, ``-``
for none), ``bytes`` (body bytes sent), ``duration`` (ms), ``type`` (the access log type) and ``sample``
(``maas.sample``: the size of the first SSE event with text and the length of its text, written
by the `lean` settle filter; the estimate of a stream without usage counts that share of the
bytes sent as text). Typed values (a key-value list, an int) are read as well. Anything else in
a record is ignored; a record that does not hold a billing record is not billed here.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Mapping

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as logs_service
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.logs.v1 import logs_pb2

from extproc.config import DEFAULT_MAX_REQUEST_TOKENS, AccountingConfig
from extproc.domain import Charge
from extproc.envoy import handover
from extproc.envoy.access_log import EntrySettler, finished

SERVICE_NAME = logs_service.DESCRIPTOR.services_by_name["LogsService"].full_name
_EXPORTED = logs_service.ExportLogsServiceResponse()
# Envoy's short response flags for a response cut short (access_log.py's _CUT_SHORT, by name).
CUT_SHORT_FLAGS = frozenset(
    ("DC", "DR", "UR", "UC", "LR", "SI", "UT", "DT", "UMSDR", "OM", "DPE", "UPE")
)
# Only the final entry of a request charges it (HCM access_log_flush_interval adds periodic ones).
_FINAL = frozenset(("DownstreamEnd", "NotSet", ""))


def plain(value: common_pb2.AnyValue) -> object:
    """An attribute's value as JSON would have it; bytes and unset values are None."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":
        return value.double_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "kvlist_value":
        return {kv.key: plain(kv.value) for kv in value.kvlist_value.values}
    if kind == "array_value":
        return [plain(v) for v in value.array_value.values]
    return None


def _json(value: common_pb2.AnyValue | None) -> object:
    """A metadata attribute: JSON text read (None for ``-`` or anything unreadable), or as typed."""
    if value is None:
        return None
    found = plain(value)
    if not isinstance(found, str):
        return found
    try:
        return json.loads(found)
    except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
        return None


def text_share(sent: int, sample: object) -> int:
    """The generated text in ``sent`` body bytes of an SSE stream, by the share of text in the
    first event the `lean` settle filter sampled (``maas.sample``: ``event_bytes``,
    ``text_chars``), rounded up; ``sent`` itself without a usable sample (an estimate from the
    bytes, as before)."""
    if not isinstance(sample, dict):
        return sent
    size, chars = sample.get("event_bytes"), sample.get("text_chars")
    if not isinstance(size, int | float) or not isinstance(chars, int | float):
        return sent
    if not 0 < chars <= size or not math.isfinite(size):
        return sent
    return math.ceil(sent * chars / size)


def _number(value: object) -> int:
    """``status`` and ``bytes``: an int, or its decimal text; anything else is 0."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit() and value.isascii() and len(value) < 20:
        return int(value)
    return 0


def charge_of(
    record: logs_pb2.LogRecord,
    config: AccountingConfig,
    max_count: int = DEFAULT_MAX_REQUEST_TOKENS,
    broken: Callable[[Exception], None] | None = None,
) -> Charge | None:
    """The charge one record stands for; None when it holds no billing record (not ours)."""
    attributes = {kv.key: kv.value for kv in record.attributes}
    kind = attributes.get("type")
    if kind is not None and plain(kind) not in _FINAL:
        return None
    namespace = _json(attributes.get("authz"))
    if not isinstance(namespace, Mapping):
        return None
    billing = handover.from_plain(namespace)
    if billing is None:
        return None
    flags = plain(attributes["flags"]) if "flags" in attributes else ""
    cut = isinstance(flags, str) and not CUT_SHORT_FLAGS.isdisjoint(flags.split(","))
    found = attributes.get("usage")

    def usage_fields() -> Mapping[str, object]:
        fields = _json(found)
        return fields if isinstance(fields, dict) else {}

    sent = _number(plain(attributes["bytes"])) if "bytes" in attributes else 0
    return finished(
        billing,
        usage_fields,
        status=_number(plain(attributes["status"])) if "status" in attributes else 0,
        body_bytes=text_share(sent, _json(attributes.get("sample"))),
        duration_ms=_number(plain(attributes["duration"])) if "duration" in attributes else 0,
        disconnected=cut,
        config=config,
        max_count=max_count,
        broken=broken,
    )


class LogsService(EntrySettler, logs_service_pb2_grpc.LogsServiceServicer):
    """Settles every billed record of a batch, then acknowledges the batch."""

    _what = "record"

    async def Export(  # noqa: N802 - the gRPC method name
        self,
        request: logs_service.ExportLogsServiceRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> logs_service.ExportLogsServiceResponse:
        settles = []
        for resource in request.resource_logs:
            for scope in resource.scope_logs:
                for record in scope.log_records:
                    try:
                        charge = charge_of(record, self._config, self._max_count, self._broken)
                    except Exception as exc:  # no billing record could be read: nothing to charge
                        self._broken(exc)
                        continue
                    if charge is not None:
                        settles.append(self._charger.start(charge))
        if settles:
            # The charger owns the tasks: a cancelled call (Envoy gave up) never cancels them.
            await asyncio.wait(settles)
        return _EXPORTED
