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
from extproc.errors import Unavailable
from extproc.observability.metrics import Metrics

log = logging.getLogger("extproc.authz")


class AuthorizationService(authz_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(
        self,
        admission: Admission,
        metrics: Metrics,
        policy: replies.HeaderPolicy = replies.TIERS,
    ) -> None:
        self._admission = admission
        self._metrics = metrics
        self._replies = replies.CheckReplies(policy=policy)
        self.policy = policy  # which X-MaaS-* headers an allow sets (ext_authz over HTTP too)
        self._plan_label = "tier" if policy.era == "tiers" else "subscription"

    async def Check(  # noqa: N802 - the gRPC method name
        self, request: authz.CheckRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> authz.CheckResponse:
        http = request.attributes.request.http
        path = http.path.split("?", 1)[0]
        decision = await self.decision(
            AdmissionRequest(
                http.method, http.path, http.headers, http.raw_body or http.body.encode()
            ),
            path,
        )
        try:
            return self._replies.reply(decision, decision.path)  # normalized: names the model route
        except Exception as exc:
            return replies.check_response(self.internal_error(exc), "")

    async def decision(self, request: AdmissionRequest, path: str) -> Decision:
        """Admission's decision, timed, counted and logged; never raises (ext_authz over gRPC
        and over HTTP both ask here)."""
        started = time.perf_counter()
        try:
            decision = await self._admission.decide(request)
        except Unavailable as exc:  # admission maps its own; this is one that got past it
            log.warning("check: dependency unavailable: %s", type(exc).__name__)
            decision = Decision(Outcome.UNAVAILABLE, "a dependency is unavailable")
        except Exception as exc:  # the reply is always a defined answer, never a broken RPC
            decision = self.internal_error(exc)
        self._metrics.decided(decision, time.perf_counter() - started)
        if not decision.allowed:
            log.info(
                "denied outcome=%s %s=%s path=%s",
                decision.outcome.value,
                self._plan_label,
                decision.tier.name if decision.tier else "",
                path,
            )
        return decision

    def internal_error(self, exc: Exception) -> Decision:
        """A bug of ours: HTTP 500, one log line naming the exception type (no traceback, which
        could carry the request's data), counted in ``maas_internal_errors_total{where="check"}``."""
        log.error("check failed: internal error %s", type(exc).__name__)
        self._metrics.internal_errors.labels("check").inc()
        return Decision(Outcome.INTERNAL_ERROR, "internal error")
