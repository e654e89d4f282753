"""One processor per kind of ext_proc stream; each answers its own messages.

- ``BillingProcessor``: the stream that follows a response and charges it (and, in the default
  layout, rewrites a stream's request to ask for usage).
- ``InjectorProcessor``: the split layout's second filter, which only rewrites the request.
- ``InlineAdmissionProcessor`` (``inline_admission.py``): admission in the stream, then billing.

A processor gets every message through ``on`` and answers with the reply to send (None: send
nothing, as in observability mode); ``done`` ends the stream; ``close`` runs when the stream ends
for any reason, and charges a response whose end never came (the client left mid-stream).
An unexpected error never escapes: ``failed`` answers the message with its neutral reply, counts
it, and the response is still charged, as an estimate.
"""

from __future__ import annotations

import logging
import time

from envoy.config.core.v3 import base_pb2 as cfg
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.charger import Charger
from extproc.config import DEFAULT_MAX_REQUEST_TOKENS, AccountingConfig
from extproc.domain import Charge
from extproc.envoy import replies
from extproc.envoy.session import Session
from extproc.observability.metrics import Metrics

log = logging.getLogger("extproc.proc")

# Replies are immutable once built; sharing them saves an allocation per message.
CONTINUE_RESPONSE_HEADERS = ep.ProcessingResponse(response_headers=ep.HeadersResponse())
CONTINUE_REQUEST_HEADERS = ep.ProcessingResponse(request_headers=ep.HeadersResponse())
CONTINUE_BODY = ep.ProcessingResponse(response_body=ep.BodyResponse())
CONTINUE_REQUEST_BODY = ep.ProcessingResponse(request_body=ep.BodyResponse())
# Responses we do not bill: stop sending us their body (one round trip instead of one per chunk).
SKIP_BODY = ep.ProcessingResponse(
    response_headers=ep.HeadersResponse(),
    mode_override=pm.ProcessingMode(response_body_mode=pm.ProcessingMode.NONE),
)
_DROP_INJECT_MARK = ep.CommonResponse(
    header_mutation=ep.HeaderMutation(remove_headers=[replies.INJECT_HEADER])
)
# The split layout's injector filter is already set to buffer the request body.
_INJECTOR_CONTINUE = ep.ProcessingResponse(
    request_headers=ep.HeadersResponse(response=_DROP_INJECT_MARK)
)
# Requests whose body we rewrite (include_usage injection): send it to us, whole.
_WANT_REQUEST_BODY = ep.ProcessingResponse(
    request_headers=ep.HeadersResponse(response=_DROP_INJECT_MARK),
    mode_override=pm.ProcessingMode(
        request_body_mode=pm.ProcessingMode.BUFFERED,
        response_header_mode=pm.ProcessingMode.SEND,
        response_body_mode=pm.ProcessingMode.STREAMED,
    ),
)
_NEUTRAL = {
    "request_headers": CONTINUE_REQUEST_HEADERS,
    "request_body": CONTINUE_REQUEST_BODY,
    "response_headers": CONTINUE_RESPONSE_HEADERS,
    "response_body": CONTINUE_BODY,
    "request_trailers": ep.ProcessingResponse(request_trailers=ep.TrailersResponse()),
    "response_trailers": ep.ProcessingResponse(response_trailers=ep.TrailersResponse()),
}
_RESPONSE_HEADERS = (":status", "content-type", "content-encoding")


def replaced_request_body(body: bytes) -> ep.ProcessingResponse:
    length = cfg.HeaderValueOption(
        header=cfg.HeaderValue(key="content-length", raw_value=str(len(body)).encode()),
        append_action=cfg.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )
    common = ep.CommonResponse(
        header_mutation=ep.HeaderMutation(set_headers=[length]),
        body_mutation=ep.BodyMutation(body=body),
    )
    return ep.ProcessingResponse(request_body=ep.BodyResponse(response=common))


def _replaced_response_body(body: bytes) -> ep.ProcessingResponse:
    common = ep.CommonResponse(body_mutation=ep.BodyMutation(body=body))
    return ep.ProcessingResponse(response_body=ep.BodyResponse(response=common))


def response_header_values(headers: ep.HttpHeaders) -> tuple[str, str, str]:
    """``:status``, ``content-type`` and ``content-encoding`` in one pass over the headers."""
    found = ["", "", ""]
    for header in headers.headers.headers:
        key = header.key
        if key in _RESPONSE_HEADERS:
            raw: bytes = header.raw_value
            found[_RESPONSE_HEADERS.index(key)] = raw.decode("latin-1") if raw else header.value
    return found[0], found[1], found[2]


class BillingProcessor:
    """Follows one response and charges it once (the default layout's only stream)."""

    def __init__(
        self,
        charger: Charger,
        metrics: Metrics,
        config: AccountingConfig,
        max_count: int = DEFAULT_MAX_REQUEST_TOKENS,
    ) -> None:
        self._charger = charger
        self._metrics = metrics
        self.session = Session(config, max_count)
        self.done = False
        # perf_counter() when the stream opened with the request's headers; 0: it did not (the
        # observability layout skips them), and the charge's duration stays unmeasured.
        self.started_s = 0.0

    async def on(self, request: ep.ProcessingRequest) -> ep.ProcessingResponse | None:
        session = self.session
        if session.billing is None and request.HasField("metadata_context"):
            session.bind(request.metadata_context.filter_metadata)
        kind = request.WhichOneof("request")
        observe = request.observability_mode
        if kind == "response_body":
            body = request.response_body
            replacement = session.on_body(body.body, body.end_of_stream)
            if body.end_of_stream:
                self.done = True  # end the RPC now, or Envoy holds the stream open
                await self._charge()
            if observe:
                return None
            return CONTINUE_BODY if replacement is None else _replaced_response_body(replacement)
        if kind == "response_headers":
            headers = request.response_headers
            status, content_type, encoding = response_header_values(headers)
            follow = session.on_response_headers(
                int(status) if status.isdigit() else 0, content_type, encoding
            )
            if headers.end_of_stream or not follow:
                await self._charge()
            if headers.end_of_stream or (not follow and observe):
                self.done = True
            if observe:
                return None
            return self.response_headers_reply(follow)
        if observe:
            return None
        if kind == "request_headers":
            return _WANT_REQUEST_BODY if session.wants_request_body else CONTINUE_REQUEST_HEADERS
        if kind == "request_body":
            return self._rewrite(request.request_body)
        return _NEUTRAL.get(kind or "", CONTINUE_BODY)

    def response_headers_reply(self, follow: bool) -> ep.ProcessingResponse:
        return CONTINUE_RESPONSE_HEADERS if follow else SKIP_BODY

    def _rewrite(self, body: ep.HttpBody) -> ep.ProcessingResponse:
        session = self.session
        if not (session.wants_request_body and body.end_of_stream):
            return CONTINUE_REQUEST_BODY
        rewritten = session.rewrite_request(body.body)
        return CONTINUE_REQUEST_BODY if rewritten is None else replaced_request_body(rewritten)

    async def _charge(self) -> None:
        charge = self._finish(disconnected=False)
        if charge is not None:
            await self._charger.charge(charge)

    def _finish(self, *, disconnected: bool) -> Charge | None:
        duration_ms = int((time.perf_counter() - self.started_s) * 1000) if self.started_s else 0
        try:
            return self.session.finish(disconnected=disconnected, duration_ms=duration_ms)
        except Exception as exc:
            self._count_error(exc)
            self.session.broken()
            return self.session.finish(disconnected=disconnected, duration_ms=duration_ms)

    def failed(self, request: ep.ProcessingRequest, exc: Exception) -> ep.ProcessingResponse | None:
        """The defined answer to a message whose handling raised: pass it on, charge an estimate."""
        self._count_error(exc)
        self.session.broken()
        kind = request.WhichOneof("request") or ""
        if kind == "response_body" and request.response_body.end_of_stream:
            self.done = True
            self.close()
        if request.observability_mode:
            return None
        return _NEUTRAL.get(kind, CONTINUE_BODY)

    def _count_error(self, exc: Exception) -> None:
        self._metrics.internal_errors.labels("ext_proc").inc()
        log.error("ext_proc message failed: %s: answered as pass-through", type(exc).__name__)

    def close(self) -> None:
        """The stream is over: a response not charged yet was cut short; charge it now."""
        if self.session.open:
            charge = self._finish(disconnected=True)
            if charge is not None:
                self._charger.start(charge)


class InjectorProcessor(BillingProcessor):
    """The split layout's request-only filter: rewrites a stream's request, never bills."""

    def __init__(self, charger: Charger, metrics: Metrics, config: AccountingConfig) -> None:
        super().__init__(charger, metrics, config)
        self.session.request_only = True

    async def on(self, request: ep.ProcessingRequest) -> ep.ProcessingResponse | None:
        session = self.session
        if session.billing is None and request.HasField("metadata_context"):
            session.bind(request.metadata_context.filter_metadata)
        kind = request.WhichOneof("request")
        if kind == "request_headers":
            return _INJECTOR_CONTINUE if session.wants_request_body else CONTINUE_REQUEST_HEADERS
        if kind == "request_body":
            return self._rewrite(request.request_body)
        return _NEUTRAL.get(kind or "", CONTINUE_BODY)
