"""Envoy's gRPC access log (ALS) -> one charge per finished request; ``finished`` for every reader.

The ``accesslog`` and ``lean`` layouts now report over Envoy's OpenTelemetry access log
(extproc/envoy/otlp_log.py: acknowledged, so at least once); this service stays for gateways
configured with ``envoy.access_loggers.http_grpc``, and ``finished`` is the charge both read.

Envoy reads the usage itself (sse_to_metadata / json_to_metadata write it into dynamic metadata,
namespace ``maas.usage``) and, once a request is over, sends its access log entry here, batched:
``envoy.service.accesslog.v3.AccessLogService.StreamAccessLogs``, one long-lived stream per Envoy
worker thread, nothing ever answered (envoyproxy/envoy api/envoy/service/accesslog/v3/als.proto).
The entry carries the whole dynamic metadata (api/envoy/data/accesslog/v3/accesslog.proto,
``AccessLogCommon.metadata``): ext_authz's billing record and the usage, beside the response code,
the response flags and the body bytes sent. The sidecar never sees a body chunk.

Which entries charge what (the README's accounting table):
- no billing record: not ours (the access log filter already leaves those out);
- usage found: as the per-schema mapping reads it (``accounting.envoy_usage``);
- none found: ``estimate.charged``, with the body bytes sent standing in for the generated text
  (an upper bound; the estimate is cut to the reservation) and flagged;
- cut short (client gone, upstream reset, timeouts: the response flags): flagged as a disconnect.

Delivery is at most once: the stream has no acknowledgement and Envoy does not resend a batch
written into a stream that then breaks (source/extensions/access_loggers/common/
grpc_access_logger.h). A worker killed with a batch in flight leaves those requests' reservations
charged and unsettled in the ledger, as a worker killed mid-stream does in the STREAMED layout.
A settle carries the admission's request id, so an entry that arrives twice is charged once.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2 as alog
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf import struct_pb2

from extproc.accounting import envoy_usage, estimate
from extproc.charger import Charger
from extproc.config import DEFAULT_MAX_REQUEST_TOKENS, AccountingConfig
from extproc.domain import Charge
from extproc.envoy import handover
from extproc.observability.metrics import Metrics

log = logging.getLogger("extproc.accesslog")

_DONE = als_pb2.StreamAccessLogsResponse()
# Response flags that say the response was cut short (Envoy's short names in brackets): the
# client left (DC, DR), the upstream reset or closed it (UR, UC), or Envoy ended it (LR, SI, UT,
# DT, UMSDR, OM), or a protocol error broke it (DPE, UPE).
_CUT_SHORT = (
    "downstream_connection_termination",
    "downstream_remote_reset",
    "upstream_remote_reset",
    "upstream_connection_termination",
    "local_reset",
    "stream_idle_timeout",
    "upstream_request_timeout",
    "duration_timeout",
    "upstream_max_stream_duration_reached",
    "overload_manager",
    "downstream_protocol_error",
    "upstream_protocol_error",
)
# Only the final entry of a request charges it (HCM access_log_flush_interval adds periodic ones).
_FINAL = frozenset({alog.AccessLogType.NotSet, alog.AccessLogType.DownstreamEnd})


def cut_short(flags: alog.ResponseFlags) -> bool:
    return any(getattr(flags, name) for name in _CUT_SHORT)


def plain(value: struct_pb2.Value) -> object:
    """A metadata value as JSON would have it (numbers are doubles: Envoy's JSON reader's)."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return value.number_value
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {k: plain(v) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [plain(v) for v in value.list_value.values]
    return None


def charge_of(
    entry: alog.HTTPAccessLogEntry,
    config: AccountingConfig,
    max_count: int = DEFAULT_MAX_REQUEST_TOKENS,
    broken: Callable[[Exception], None] | None = None,
) -> Charge | None:
    """The charge one finished request's entry stands for; None when it is not billed here.

    Reading the usage never raises out of here: an unexpected error goes to ``broken`` and the
    response is charged as if no usage had been found (a flagged estimate).
    """
    common = entry.common_properties
    if common.intermediate_log_entry or common.access_log_type not in _FINAL:
        return None
    metadata = common.metadata.filter_metadata
    billing = handover.read(metadata)
    if billing is None:
        return None
    found = metadata.get(envoy_usage.NAMESPACE)
    # Envoy's first downstream byte received to its last byte sent: the request's duration.
    last_byte = "time_to_last_downstream_tx_byte"
    duration_ms = getattr(common, last_byte).ToMilliseconds() if common.HasField(last_byte) else 0
    return finished(
        billing,
        lambda: {k: plain(v) for k, v in found.fields.items()} if found is not None else {},
        status=entry.response.response_code.value,
        body_bytes=entry.response.response_body_bytes,
        disconnected=cut_short(common.response_flags),
        config=config,
        max_count=max_count,
        broken=broken,
        duration_ms=max(0, duration_ms),
    )


def finished(
    billing: handover.Billing,
    usage_fields: Callable[[], Mapping[str, object]],
    *,
    status: int,
    body_bytes: int,
    disconnected: bool,
    config: AccountingConfig,
    max_count: int,
    broken: Callable[[Exception], None] | None,
    duration_ms: int = 0,
) -> Charge:
    """The charge of one finished request, whichever access log reported it: the usage Envoy
    read (``usage_fields``, namespace ``maas.usage`` as plain values), else the estimate with
    the body bytes sent standing in for the text. Reading the usage never raises out of here
    when ``broken`` is given: the response is then charged as if none had been found."""
    try:
        usage = envoy_usage.usage_of(billing.path, usage_fields(), max_count)
    except Exception as exc:
        if broken is None:
            raise
        broken(exc)
        usage = None
    charged = estimate.charged(
        usage,
        failed=status >= 400,
        prompt_estimate=billing.prompt_estimate,
        content_chars=body_bytes,
        chars_per_token=config.chars_per_token,
        cap=billing.reserved or None,
        who=(billing.userid, billing.model),
    )
    return billing.charge(charged, status, disconnected=disconnected, duration_ms=duration_ms)


class EntrySettler:
    """What both access-log services share: the charger, and one defined answer for an entry
    whose billing record cannot be read (counted, one log line, charged as without usage)."""

    _what = "entry"  # the log line's name for one log item

    def __init__(
        self,
        charger: Charger,
        metrics: Metrics,
        config: AccountingConfig | None = None,
        max_count: int = DEFAULT_MAX_REQUEST_TOKENS,
    ) -> None:
        self._charger = charger
        self._metrics = metrics
        self._config = config or AccountingConfig()
        self._max_count = max_count

    def _broken(self, exc: Exception) -> None:
        self._metrics.internal_errors.labels("access_log").inc()
        log.error(
            "access log %s failed: %s: charged as without usage", self._what, type(exc).__name__
        )


class AccessLogService(EntrySettler, als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Settles every billed entry in a task of the charger's; never answers until Envoy hangs up."""

    async def StreamAccessLogs(  # noqa: N802 - the gRPC method name
        self,
        requests: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[object, object],
    ) -> als_pb2.StreamAccessLogsResponse:
        async for message in requests:
            for entry in message.http_logs.log_entry:
                try:
                    charge = charge_of(entry, self._config, self._max_count, self._broken)
                except Exception as exc:  # no billing record could be read: nothing to charge
                    self._broken(exc)
                    continue
                if charge is not None:
                    self._charger.start(charge)
        return _DONE
