"""The ext_authz Check service: request attributes -> admission -> CheckResponse (never raises)."""

from __future__ import annotations

import logging
import time

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as authz
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc

from extproc.admission import Admission, AdmissionRequest
from extproc.domain import Decision, Outcome
from extproc.envoy import replies
from extproc.observability.metrics import Metrics

log = logging.getLogger("extproc.authz")


class AuthorizationService(authz_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, admission: Admission, metrics: Metrics) -> None:
        self._admission = admission
        self._metrics = metrics
        self._replies = replies.CheckReplies()

    async def Check(  # noqa: N802 - the gRPC method name
        self, request: authz.CheckRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> authz.CheckResponse:
        started = time.perf_counter()
        http = request.attributes.request.http
        path = http.path
        try:
            decision = await self._admission.decide(
                AdmissionRequest(
                    http.method, path, http.headers, http.raw_body or http.body.encode()
                )
            )
        except Exception:  # the reply must always be a decision, never a broken RPC
            log.exception("admission failed unexpectedly")
            decision = Decision(Outcome.UNAVAILABLE, "internal error")
        self._metrics.decided(decision, time.perf_counter() - started)
        if not decision.allowed:
            log.info(
                "denied outcome=%s tier=%s path=%s",
                decision.outcome.value,
                decision.tier.name if decision.tier else "",
                path.split("?", 1)[0],
            )
        return self._replies.reply(decision, decision.path)  # normalized: names the model route
