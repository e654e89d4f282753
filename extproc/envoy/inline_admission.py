"""Admission inside the ext_proc stream (``server.admission: ext_proc``): no ext_authz call at all.

Request headers -> (for charged POSTs: the buffered request body) -> Decision -> an immediate
refusal, or the request continued with our headers and, where needed, the include_usage rewrite;
then the response is followed and charged as by ``BillingProcessor``.
"""

from __future__ import annotations

import time

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.admission import Admission, AdmissionRequest
from extproc.charger import Charger
from extproc.config import DEFAULT_MAX_REQUEST_TOKENS, AccountingConfig
from extproc.envoy import replies
from extproc.envoy.handover import Billing
from extproc.envoy.processors import BillingProcessor
from extproc.envoy.session import with_include_usage
from extproc.observability.metrics import Metrics
from extproc.routes import RouteTable

_BUFFER_REQUEST_BODY = pm.ProcessingMode(
    request_body_mode=pm.ProcessingMode.BUFFERED,
    response_header_mode=pm.ProcessingMode.SEND,
    response_body_mode=pm.ProcessingMode.STREAMED,
)
_SKIP_RESPONSE_BODY = pm.ProcessingMode(
    response_header_mode=pm.ProcessingMode.SEND,
    response_body_mode=pm.ProcessingMode.NONE,
)


class InlineAdmission:
    """What every inline stream shares: the same ``Admission`` as the ext_authz service."""

    def __init__(
        self,
        admission: Admission,
        routes: RouteTable,
        metrics: Metrics,
        policy: replies.HeaderPolicy = replies.TIERS,
    ) -> None:
        self.admission = admission
        self.routes = routes
        self.metrics = metrics
        self.policy = policy


class InlineAdmissionProcessor(BillingProcessor):
    """Admits the request from its headers (and body), then bills its response."""

    def __init__(
        self,
        inline: InlineAdmission,
        charger: Charger,
        metrics: Metrics,
        config: AccountingConfig,
        max_count: int = DEFAULT_MAX_REQUEST_TOKENS,
    ) -> None:
        super().__init__(charger, metrics, config, max_count)
        self._inline = inline
        self._pending: AdmissionRequest | None = None  # waiting for the request body

    async def on(self, request: ep.ProcessingRequest) -> ep.ProcessingResponse | None:
        kind = request.WhichOneof("request")
        if kind == "request_headers" and not request.observability_mode:
            return await self._on_request_headers(request.request_headers)
        if kind == "request_body" and self._pending is not None:
            pending, self._pending = self._pending, None
            return await self._decide(pending, request.request_body.body, in_headers=False)
        return await super().on(request)

    def response_headers_reply(self, follow: bool) -> ep.ProcessingResponse:
        """The response-headers reply carrying the remaining budget."""
        decision = self.session.decision
        mutation = replies.response_mutation(decision) if decision is not None else None
        reply = ep.ProcessingResponse(
            response_headers=ep.HeadersResponse(
                response=ep.CommonResponse(header_mutation=mutation)
            )
        )
        if not follow:
            reply.mode_override.response_body_mode = pm.ProcessingMode.NONE
        return reply

    async def _on_request_headers(self, message: ep.HttpHeaders) -> ep.ProcessingResponse:
        headers: dict[str, str] = {}
        for header in message.headers.headers:
            raw: bytes = header.raw_value
            headers[header.key] = raw.decode("latin-1") if raw else str(header.value)
        method, path = headers.get(":method", ""), headers.get(":path", "")
        request = AdmissionRequest(method, path, headers)
        if not message.end_of_stream and self._inline.routes.classify(method, path).charged:
            # The body tells the model, max_tokens and whether to ask for usage: wait for it.
            self._pending = request
            return ep.ProcessingResponse(
                request_headers=ep.HeadersResponse(), mode_override=_BUFFER_REQUEST_BODY
            )
        return await self._decide(request, b"", in_headers=True)

    async def _decide(
        self, request: AdmissionRequest, body: bytes, *, in_headers: bool
    ) -> ep.ProcessingResponse:
        started = time.perf_counter()
        decision = await self._inline.admission.decide(
            AdmissionRequest(request.method, request.path, request.headers, body)
        )
        self._inline.metrics.decided(decision, time.perf_counter() - started)
        if not decision.allowed:
            self.done = True
            return replies.immediate_response(decision)
        session = self.session
        session.decision = decision
        session.billing = Billing.from_decision(decision, decision.path)
        rewritten = with_include_usage(body) if decision.inject_usage and body else None
        session.injected = rewritten is not None
        common = ep.CommonResponse(
            header_mutation=replies.request_mutation(
                decision, len(rewritten) if rewritten is not None else -1, self._inline.policy
            )
        )
        if rewritten is not None:
            common.body_mutation.body = rewritten
        if in_headers:
            reply = ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=common))
            if not decision.charged:
                reply.mode_override.CopyFrom(_SKIP_RESPONSE_BODY)
            return reply
        return ep.ProcessingResponse(request_body=ep.BodyResponse(response=common))
