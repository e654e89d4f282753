"""The ext_proc Process stream: picks one processor per stream and hands it every message."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import grpc
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from extproc.charger import Charger
from extproc.config import DEFAULT_MAX_REQUEST_TOKENS, AccountingConfig
from extproc.envoy.inline_admission import InlineAdmission, InlineAdmissionProcessor
from extproc.envoy.processors import BillingProcessor, InjectorProcessor
from extproc.observability.metrics import Metrics

log = logging.getLogger("extproc.proc")


class ExternalProcessorService(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(
        self,
        charger: Charger,
        metrics: Metrics,
        config: AccountingConfig | None = None,
        inline: InlineAdmission | None = None,
        max_count: int = DEFAULT_MAX_REQUEST_TOKENS,
    ) -> None:
        self._charger = charger
        self._metrics = metrics
        self._config = config or AccountingConfig()
        self._max_count = max_count  # limits.max_request_tokens: larger usage is not trusted
        self._inline = inline  # admission in this stream (server.admission: ext_proc)

    async def Process(  # noqa: N802 - the gRPC method name
        self,
        requests: AsyncIterator[ep.ProcessingRequest],
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[ep.ProcessingResponse]:
        started = time.perf_counter()
        processor: BillingProcessor | None = None
        try:
            async for request in requests:
                if processor is None:
                    processor = self._processor_for(request)
                    if request.HasField("request_headers"):
                        processor.started_s = started
                try:
                    reply = await processor.on(request)
                except Exception as exc:
                    reply = processor.failed(request, exc)
                if reply is not None:
                    yield reply
                if processor.done:
                    break
        finally:
            self._metrics.stream_seconds.observe(time.perf_counter() - started)
            if processor is not None:
                processor.close()  # cancelled or ended early: charge what was cut short

    def _processor_for(self, first: ep.ProcessingRequest) -> BillingProcessor:
        """The processor for this stream, from the filter that opened it."""
        if self._inline is not None:
            return InlineAdmissionProcessor(
                self._inline, self._charger, self._metrics, self._config, self._max_count
            )
        # A filter that never sees the response (the split layout's injector) only rewrites the
        # request: its stream is not the one that bills.
        if (
            first.HasField("protocol_config")
            and first.protocol_config.response_body_mode == pm.ProcessingMode.NONE
        ):
            return InjectorProcessor(self._charger, self._metrics, self._config)
        return BillingProcessor(self._charger, self._metrics, self._config, self._max_count)
