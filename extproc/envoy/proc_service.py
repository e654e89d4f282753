"""The ext_proc Process stream: dispatches Envoy's messages to one Session per HTTP request."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc
from envoy.config.core.v3 import base_pb2 as cfg
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from extproc.charger import Charger
from extproc.config import AccountingConfig
from extproc.envoy import replies
from extproc.envoy.inline_admission import InlineAdmission, response_headers_reply
from extproc.envoy.session import Session
from extproc.observability.metrics import Metrics

log = logging.getLogger("extproc.proc")

# Replies are immutable once built; sharing them saves an allocation per message.
_CONTINUE_RESPONSE_HEADERS = ep.ProcessingResponse(response_headers=ep.HeadersResponse())
_CONTINUE_REQUEST_HEADERS = ep.ProcessingResponse(request_headers=ep.HeadersResponse())
_CONTINUE_BODY = ep.ProcessingResponse(response_body=ep.BodyResponse())
_CONTINUE_REQUEST_BODY = ep.ProcessingResponse(request_body=ep.BodyResponse())
# Responses we do not bill: stop sending us their body (one round trip instead of one per chunk).
_SKIP_BODY = ep.ProcessingResponse(
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


def _replaced_request_body(body: bytes) -> ep.ProcessingResponse:
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


_RESPONSE_HEADERS = (":status", "content-type", "content-encoding")


def response_header_values(headers: ep.HttpHeaders) -> tuple[str, str, str]:
    """``:status``, ``content-type`` and ``content-encoding`` in one pass over the headers."""
    found = ["", "", ""]
    for header in headers.headers.headers:
        key = header.key
        if key in _RESPONSE_HEADERS:
            raw: bytes = header.raw_value
            found[_RESPONSE_HEADERS.index(key)] = raw.decode("latin-1") if raw else header.value
    return found[0], found[1], found[2]


class ExternalProcessorService(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(
        self,
        charger: Charger,
        metrics: Metrics,
        config: AccountingConfig | None = None,
        inline: InlineAdmission | None = None,
    ) -> None:
        self._charger = charger
        self._metrics = metrics
        self._config = config or AccountingConfig()
        self._inline = inline  # admission in this stream (server.admission: ext_proc)
        self._background: set[asyncio.Task[None]] = set()

    async def Process(  # noqa: N802 - the gRPC method name
        self,
        requests: AsyncIterator[ep.ProcessingRequest],
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[ep.ProcessingResponse]:
        session = Session(self._config)
        started = time.perf_counter()
        try:
            async for request in requests:
                kind = request.WhichOneof("request")
                if session.billing is None and request.HasField("metadata_context"):
                    session.bind(request.metadata_context.filter_metadata)
                if request.HasField("protocol_config"):
                    # A filter that never sees the response (the split layout's injector) only
                    # rewrites the request: its stream is not the one that bills.
                    none = pm.ProcessingMode.NONE
                    session.request_only = request.protocol_config.response_body_mode == none
                if kind == "response_body":
                    body = request.response_body
                    replacement = session.on_body(body.body, body.end_of_stream)
                    if body.end_of_stream:
                        await self._charge(session)
                    if request.observability_mode:
                        pass
                    elif replacement is None:
                        yield _CONTINUE_BODY
                    else:
                        yield _replaced_response_body(replacement)
                    if body.end_of_stream:
                        break  # end the RPC now, or Envoy holds the stream open
                elif kind == "response_headers":
                    headers = request.response_headers
                    status, content_type, encoding = response_header_values(headers)
                    follow = session.on_response_headers(
                        int(status) if status.isdigit() else 0, content_type, encoding
                    )
                    if headers.end_of_stream or not follow:
                        await self._charge(session)
                    if request.observability_mode:
                        pass
                    elif self._inline is not None:
                        yield response_headers_reply(session.decision, follow)
                    else:
                        yield _CONTINUE_RESPONSE_HEADERS if follow else _SKIP_BODY
                    if headers.end_of_stream or (not follow and request.observability_mode):
                        break
                elif kind == "request_headers":
                    if request.observability_mode:
                        continue
                    if self._inline is not None:
                        reply = await self._inline.on_request_headers(
                            session, request.request_headers
                        )
                        yield reply
                        if reply.HasField("immediate_response"):
                            break
                        continue
                    if not session.wants_request_body:
                        yield _CONTINUE_REQUEST_HEADERS
                    elif session.request_only:
                        yield _INJECTOR_CONTINUE
                    else:
                        yield _WANT_REQUEST_BODY
                elif kind == "request_body":
                    if request.observability_mode:
                        continue
                    if self._inline is not None and session.pending is not None:
                        reply = await self._inline.on_request_body(
                            session, request.request_body.body
                        )
                        yield reply
                        if reply.HasField("immediate_response"):
                            break
                        continue
                    rewritten = (
                        session.rewrite_request(request.request_body.body)
                        if session.wants_request_body and request.request_body.end_of_stream
                        else None
                    )
                    if rewritten is None:
                        yield _CONTINUE_REQUEST_BODY
                    else:
                        yield _replaced_request_body(rewritten)
                elif not request.observability_mode:
                    yield _continue_other(kind)
        finally:
            self._metrics.stream_seconds.observe(time.perf_counter() - started)
            if session.open:
                # Cancelled or ended early: the client left mid-stream. The handler is being torn
                # down, so settle in a task that outlives it (CONTRACTS §11).
                self._spawn(session)

    async def _charge(self, session: Session) -> None:
        charge = session.finish()
        if charge is not None:
            await self._charger.charge(charge)

    def _spawn(self, session: Session) -> None:
        charge = session.finish(disconnected=True)
        if charge is None:
            return
        task = asyncio.get_running_loop().create_task(self._charger.charge(charge))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for charges still settling in the background (graceful stop)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def _continue_other(kind: str | None) -> ep.ProcessingResponse:
    if kind == "request_trailers":
        return ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
    return ep.ProcessingResponse(response_trailers=ep.TrailersResponse())
