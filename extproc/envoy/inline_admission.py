"""Admission inside the ext_proc stream (``server.admission: ext_proc``): no ext_authz call at all.

Request headers -> (for charged POSTs: the buffered request body) -> Decision -> an immediate
refusal, or the request continued with our headers and, where needed, the include_usage rewrite.
"""

from __future__ import annotations

import time

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.admission import Admission, AdmissionRequest
from extproc.domain import Decision
from extproc.envoy import replies
from extproc.envoy.session import Billing, Session, with_include_usage
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
    """Runs the same ``Admission`` as the ext_authz service and answers in ext_proc terms."""

    def __init__(self, admission: Admission, routes: RouteTable, metrics: Metrics) -> None:
        self._admission = admission
        self._routes = routes
        self._metrics = metrics

    async def on_request_headers(
        self, session: Session, message: ep.HttpHeaders
    ) -> ep.ProcessingResponse:
        headers: dict[str, str] = {}
        for header in message.headers.headers:
            raw: bytes = header.raw_value
            headers[header.key] = raw.decode("latin-1") if raw else str(header.value)
        method, path = headers.get(":method", ""), headers.get(":path", "")
        request = AdmissionRequest(method, path, headers)
        if not message.end_of_stream and self._routes.classify(method, path).charged:
            # The body tells the model, max_tokens and whether to ask for usage: wait for it.
            session.pending = request
            return ep.ProcessingResponse(
                request_headers=ep.HeadersResponse(), mode_override=_BUFFER_REQUEST_BODY
            )
        return await self._decide(session, request, b"", in_headers=True)

    async def on_request_body(self, session: Session, body: bytes) -> ep.ProcessingResponse:
        request, session.pending = session.pending, None
        assert request is not None
        return await self._decide(session, request, body, in_headers=False)

    async def _decide(
        self, session: Session, request: AdmissionRequest, body: bytes, *, in_headers: bool
    ) -> ep.ProcessingResponse:
        started = time.perf_counter()
        decision = await self._admission.decide(
            AdmissionRequest(request.method, request.path, request.headers, body)
        )
        self._metrics.decided(decision, time.perf_counter() - started)
        if not decision.allowed:
            return replies.immediate_response(decision)
        session.decision = decision
        session.billing = Billing.from_decision(decision, request.path.split("?", 1)[0])
        rewritten = with_include_usage(body) if decision.inject_usage and body else None
        session.injected = rewritten is not None
        common = ep.CommonResponse(
            header_mutation=replies.request_mutation(
                decision, len(rewritten) if rewritten is not None else -1
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


def response_headers_reply(decision: Decision | None, follow: bool) -> ep.ProcessingResponse:
    """The response-headers reply carrying the remaining budget (inline admission only)."""
    mutation = replies.response_mutation(decision) if decision is not None else None
    reply = ep.ProcessingResponse(
        response_headers=ep.HeadersResponse(response=ep.CommonResponse(header_mutation=mutation))
    )
    if not follow:
        reply.mode_override.response_body_mode = pm.ProcessingMode.NONE
    return reply
