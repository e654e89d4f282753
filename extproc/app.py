"""Composition root: builds the store, sources, limiter and services from Config; starts and stops."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import signal
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2, external_processor_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc

from extproc import tls
from extproc.admission import Admission
from extproc.authz.api_keys import ApiKeyIdentities
from extproc.authz.base import (
    AccessChecker,
    AllowAll,
    IdentitySource,
    PlanSource,
    TierPlans,
    TierSource,
)
from extproc.authz.kube import KubeConnector
from extproc.authz.tiers import FileTiers
from extproc.charger import Charger, fan_out
from extproc.config import Config, Secret, StoreConfig
from extproc.envoy.access_log import AccessLogService
from extproc.envoy.authz_service import AuthorizationService
from extproc.envoy.http_authz import HttpAuthorization
from extproc.envoy.http_settle import HttpSettle
from extproc.envoy.inline_admission import InlineAdmission
from extproc.envoy.otlp_log import SERVICE_NAME as LOGS_SERVICE_NAME
from extproc.envoy.otlp_log import LogsService
from extproc.envoy.proc_service import ExternalProcessorService
from extproc.envoy.replies import HeaderPolicy
from extproc.export.stream import MemoryRecords
from extproc.kuadrant.route_map import RouteDomains
from extproc.limits.alerts import BudgetAlerts
from extproc.limits.limiter import Limiter
from extproc.logs import configure as configure_logging
from extproc.observability.metrics import Metrics, serve_metrics
from extproc.observability.model_labels import ModelLabels
from extproc.observability.telemetry import GenAiTelemetry, build_telemetry
from extproc.observability.usage_api import UsageApi
from extproc.observability.usage_query import GROUPS, SUBSCRIPTION_GROUPS
from extproc.routes import RouteTable
from extproc.store.base import CounterStore
from extproc.store.memory import MemoryStore
from extproc.store.resilient import ResilientStore
from extproc.supervisor import Supervisor

if TYPE_CHECKING:
    from extproc.export.cloudevents import CloudEventsPusher
    from extproc.kuadrant.httproutes import WatchedRoutes
    from extproc.kuadrant.policies import PolicyLimits
    from extproc.kuadrant.reporter import Reporter
    from extproc.subscriptions.maas_api import MaasApi

log = logging.getLogger("extproc.app")

SERVICE_NAMES = (
    external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name,
    external_processor_pb2.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name,
    als_pb2.DESCRIPTOR.services_by_name["AccessLogService"].full_name,
    LOGS_SERVICE_NAME,
)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def store_config(config: Config) -> StoreConfig:
    """``store`` with the settle ids kept at least as long as the longest token window."""
    longest = max(
        (
            limits.tokens_window_s
            for limits in (
                *config.limits.tiers.values(),
                *(m for per_tier in config.limits.models.values() for m in per_tier.values()),
            )
            if limits.tokens
        ),
        default=0,
    )
    return replace(config.store, dedupe_ttl_s=max(config.store.dedupe_ttl_s, longest))


def build_inner_store(config: Config) -> CounterStore:
    """The bare store for ``store.url``, without the failure policy (for one-shot readers)."""
    settings = store_config(config)
    url = str(settings.url)
    stream = config.export.stream
    if url.startswith("memory:"):
        return MemoryStore(
            retention_days=settings.retention_days,
            dedupe_ttl_ms=settings.dedupe_ttl_s * 1000,
            records=MemoryRecords(stream.key, stream.maxlen) if stream.enabled else None,
        )
    from extproc.store.redis import RedisStore

    return RedisStore.from_config(settings, stream)


def build_store(config: Config, metrics: Metrics) -> ResilientStore:
    """The serving store: the bare store wrapped in the failure policy and its charge spool."""
    return ResilientStore(build_inner_store(config), store_config(config), metrics)


def build_alerts(config: Config, metrics: Metrics, store: ResilientStore) -> BudgetAlerts | None:
    """Soft-limit events and shadow reports, when some budget has thresholds or a shadow mode."""
    budgets = config.limits.budgets
    if not any(b.soft or not b.enforce for b in budgets):
        return None
    return BudgetAlerts(store, metrics, config.limits.alerts, now_ms)


def build_identities(config: Config, metrics: Metrics, kube: KubeConnector) -> IdentitySource:
    source = config.identity.source
    if source == "maas_api_keys":
        from extproc.subscriptions.identity import MaasApiKeys

        tokens = _token_identities(config, config.identity.tokens, metrics, kube)
        return MaasApiKeys(build_maas_api(config), tokens, config.subscriptions, metrics)
    return _token_identities(config, source, metrics, kube)


def _token_identities(
    config: Config, source: str, metrics: Metrics, kube: KubeConnector
) -> IdentitySource:
    if source == "api_keys":
        return ApiKeyIdentities.from_file(config.path(config.identity.api_keys_file))
    from extproc.authz.kubernetes_identity import KubernetesIdentities

    # The subscription era counts users by their whole username, as MaaS's gateway policy.
    subscriptions = config.maas.era == "subscriptions"
    return KubernetesIdentities(kube(), config.identity, metrics, full_username=subscriptions)


def build_maas_api(config: Config) -> MaasApi:
    """A client of maas-api's internal endpoints (subscription era)."""
    from extproc.subscriptions.maas_api import MaasApi

    settings = config.subscriptions
    ca_file = config.path(settings.maas_api_ca_file) if settings.maas_api_ca_file else None
    return MaasApi(settings.maas_api_url, ca_file=ca_file, timeout_s=settings.timeout_s)


def build_plans(
    config: Config,
    metrics: Metrics,
    kube: KubeConnector,
    domains: RouteDomains,
    policies: PolicyLimits | None,
) -> PlanSource:
    """Tiers (the tier era), or MaaSSubscriptions selected per request (the subscription era)."""
    if config.maas.era == "tiers":
        return TierPlans(build_tiers(config, metrics, kube))
    from extproc.subscriptions.plans import (
        MaasApiSelector,
        Selector,
        SubscriptionPlans,
        WatchSelector,
    )

    settings = config.subscriptions
    selector: Selector
    if settings.selection == "maas_api":
        selector = MaasApiSelector(
            build_maas_api(config), metrics, ttl_s=settings.select_cache_ttl_s
        )
    else:
        from extproc.subscriptions.watch import WatchedSubscriptions

        selector = WatchSelector(WatchedSubscriptions(kube(), settings.namespace))
    return SubscriptionPlans(
        selector,
        metrics,
        route_of=lambda namespace, name: domains.domain(namespace, name, ""),
        declared=policies.rates_for if policies is not None else lambda _key: None,
    )


def build_tiers(config: Config, metrics: Metrics, kube: KubeConnector) -> TierSource:
    if config.tiers.source == "file":
        return FileTiers.from_file(config.path(config.tiers.file), config.tiers.instance)
    if config.tiers.source == "configmap":
        from extproc.authz.configmap_tiers import ConfigMapTiers

        return ConfigMapTiers(kube(), config.tiers, metrics)
    from extproc.authz.maas_api_tiers import MaasApiTiers

    ca_file = config.tiers.maas_api_ca_file
    return MaasApiTiers(config.tiers, metrics, ca_file=config.path(ca_file) if ca_file else None)


def build_access(config: Config, metrics: Metrics, kube: KubeConnector) -> AccessChecker:
    if config.access.check == "none":
        return AllowAll()
    from extproc.authz.access_review import SubjectAccessReviewAccess

    return SubjectAccessReviewAccess(kube(), config.access, metrics)


def build_policies(config: Config, metrics: Metrics, kube: KubeConnector) -> PolicyLimits | None:
    """Watched Kuadrant policies overlaying the configured limits (``kuadrant.policies: watch``).

    The subscription era's are the per-model TokenRateLimitPolicies MaaS's controller writes in
    each model route's namespace: watched in every namespace.
    """
    if config.kuadrant.policies != "watch":
        return None
    from extproc.kuadrant.policies import REQUEST_POLICIES, TOKEN_POLICIES, PolicyLimits

    # The subscription era: MaaS's per-model policies, in every model route's namespace.
    per_model = config.maas.era == "subscriptions"
    return PolicyLimits(
        kube(),
        config.kuadrant,
        config.limits,
        metrics,
        charged_suffixes=config.routes.charged_suffixes,
        kinds=(TOKEN_POLICIES,) if per_model else (TOKEN_POLICIES, REQUEST_POLICIES),
        namespace="" if per_model else None,
    )


def build_routes(
    config: Config, metrics: Metrics, kube: KubeConnector
) -> tuple[RouteDomains, WatchedRoutes | None]:
    """The HTTPRoute of each request (``kuadrant.httproutes: watch`` follows KServe's routes)."""
    watched = None
    if config.kuadrant.httproutes == "watch":
        from extproc.kuadrant.httproutes import WatchedRoutes

        watched = WatchedRoutes(kube(), config.kuadrant.model_header, metrics)
    domains = RouteDomains(
        config.kuadrant, config.access.body_models, watched.index if watched else None
    )
    return domains, watched


def build_pusher(
    config: Config, store: ResilientStore, metrics: Metrics
) -> CloudEventsPusher | None:
    """The CloudEvents pusher (``export.cloudevents.url``), reading the store's export stream."""
    settings = config.export.cloudevents
    if not settings.url:
        return None
    from extproc.export.cloudevents import CloudEventsPusher
    from extproc.export.stream import redis_records

    inner = store.inner
    if isinstance(inner, MemoryStore) and inner.records is not None:
        return CloudEventsPusher(inner.records, settings, metrics, close_source=False)
    # A client of its own: its blocking reads must not hold the store's connections.
    timeout_s = 1.0 + max(config.store.timeout_s, 1.0) + 1
    source = redis_records(str(config.store.url), config.export.stream.key, timeout_s)
    return CloudEventsPusher(source, settings, metrics)


def build_reporter(
    config: Config, metrics: Metrics, policies: PolicyLimits | None
) -> Reporter | None:
    """The Limitador reporter for ``kuadrant.mode`` gaps or all; None when off."""
    settings = config.kuadrant
    if settings.mode == "off":
        return None
    from extproc.kuadrant.limitador import LimitadorLimits
    from extproc.kuadrant.policies import limit_names
    from extproc.kuadrant.reporter import Reporter

    limits = LimitadorLimits(
        settings.limitador_http, refresh_s=settings.refresh_s, timeout_s=settings.timeout_s
    )
    declared = policies.subscription_limit if policies is not None else lambda _key: None
    return Reporter(settings, metrics, limits, limit_names(settings, policies), declared=declared)


@dataclass
class Sidecar:
    """Everything one worker process runs, wired together."""

    config: Config
    metrics: Metrics
    store: ResilientStore
    identities: IdentitySource
    plans: PlanSource
    access: AccessChecker
    admission: Admission
    authz: AuthorizationService
    proc: ExternalProcessorService
    charger: Charger
    access_log: AccessLogService
    logs: LogsService
    reporter: Reporter | None = None
    alerts: BudgetAlerts | None = None
    policies: PolicyLimits | None = None
    routes: WatchedRoutes | None = None
    telemetry: GenAiTelemetry | None = None
    pusher: CloudEventsPusher | None = None

    @classmethod
    def build(cls, config: Config, metrics: Metrics | None = None) -> Sidecar:
        era = config.maas.era
        metrics = metrics or Metrics(
            per_user=config.observability.per_user_metrics,
            era=era,
            models=ModelLabels.from_config(config),
        )
        if era == "tiers":
            metrics.set_limits(config.limits.tiers)
        store = build_store(config, metrics)
        kube = KubeConnector.for_config(config)  # one shared client, built if needed
        identities, access = (
            build_identities(config, metrics, kube),
            build_access(config, metrics, kube),
        )
        policies = build_policies(config, metrics, kube)
        domains, watched_routes = build_routes(config, metrics, kube)
        plans = build_plans(config, metrics, kube, domains, policies)
        alerts = build_alerts(config, metrics, store)
        limiter = Limiter(
            store,
            policies or config.limits,
            now_ms,
            events=alerts,
            prices=config.pricing,
            export=config.export.stream.enabled,
        )
        routes = RouteTable(config.routes)
        policy = HeaderPolicy(era, config.subscriptions.identity_headers)
        admission = Admission(
            routes,
            identities,
            None,
            access,
            limiter,
            plans=plans,
            era=era,
            spoofed_headers=config.routes.spoofed_headers,
            unclassified=config.routes.unclassified,
            store_failure=config.store.failure_policy,
            dependency_failure=config.identity.unavailable,
            accounting=config.accounting,
            route_of=domains.domain,
            max_request_tokens=config.limits.max_request_tokens,
        )
        reporter = build_reporter(config, metrics, policies)
        telemetry = build_telemetry(config.telemetry, metrics.models, era=era)
        charger = Charger(
            limiter,
            metrics,
            fan_out(reporter, telemetry),
            wait_s=config.accounting.settle_wait_s,
            prices=config.pricing,
        )
        return cls(
            config,
            metrics,
            store,
            identities,
            plans,
            access,
            admission,
            AuthorizationService(admission, metrics, policy),
            ExternalProcessorService(
                charger,
                metrics,
                config.accounting,
                InlineAdmission(admission, routes, metrics, policy)
                if config.server.admission == "ext_proc"
                else None,
                max_count=config.limits.max_request_tokens,
            ),
            charger,
            AccessLogService(
                charger, metrics, config.accounting, max_count=config.limits.max_request_tokens
            ),
            LogsService(
                charger, metrics, config.accounting, max_count=config.limits.max_request_tokens
            ),
            reporter,
            alerts,
            policies,
            watched_routes,
            telemetry,
            build_pusher(config, store, metrics),
        )

    async def start(self) -> None:
        """Warm up what can be warmed before the first request (e.g. the store's scripts)."""
        await self.store.start()
        if self.reporter is not None:
            self.reporter.start()
        if self.pusher is not None:
            await self.pusher.start()
        if self.telemetry is not None:
            self.telemetry.start()

    async def close(self) -> None:
        """Settle what is pending, flush the Kuadrant queue, then close the store (its spool)."""
        await asyncio.sleep(0)  # let handlers cancelled by the server's stop start their charges
        log.info("settling %d pending charges", self.charger.pending)
        await self.charger.drain()
        if self.reporter is not None:
            log.info("flushing the Kuadrant report queue")
            await self.reporter.close()  # after the drain: the last charges are queued by now
        if self.pusher is not None:  # what it has not acknowledged stays pending in the stream
            await self.pusher.close()
        if self.telemetry is not None:
            log.info("exporting the last OpenTelemetry metrics")
            await asyncio.to_thread(self.telemetry.shutdown)
        if self.alerts is not None:
            await self.alerts.close()
        if self.policies is not None:
            await self.policies.close()
        if self.routes is not None:
            await self.routes.close()
        for part in (self.identities, self.plans, self.access):
            await part.close()
        log.info("closing the store: %d spooled charges to replay", self.store.spooled)
        await self.store.close()


class Server:
    """A grpc.aio server with the sidecar's services and health on one port, reflection and TLS
    as configured (``server.reflection``, ``server.tls``), and health alone on a plaintext
    ``server.health_port`` if one is set."""

    def __init__(self, sidecar: Sidecar, host: str, port: int) -> None:
        self.sidecar = sidecar
        settings = sidecar.config.server
        self.http_authz = (
            HttpAuthorization(
                sidecar.authz,
                HttpSettle(
                    sidecar.charger,
                    max_count=sidecar.config.limits.max_request_tokens,
                    config=sidecar.config.accounting,
                ),
                tls.HttpTls.from_config(sidecar.config),
            )
            if settings.authz_http_port
            else None
        )
        if self.http_authz is not None:
            self.http_authz.hide_usage = sidecar.config.accounting.hide_injected_usage
        # so_reuseport off: a second server must fail to bind, not silently share the port.
        options: list[tuple[str, Any]] = [
            ("grpc.so_reuseport", 0),
            ("grpc.max_concurrent_streams", 10_000),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        self.grpc = grpc.aio.server(options=options, interceptors=tls.interceptors(settings.tls))
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(sidecar.authz, self.grpc)
        external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(sidecar.proc, self.grpc)
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(sidecar.access_log, self.grpc)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(sidecar.logs, self.grpc)  # type: ignore[no-untyped-call]
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        if settings.reflection:
            reflection.enable_server_reflection(
                (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
            )
        bound = tls.add_port(self.grpc, f"{host}:{port}", sidecar.config)
        if bound == 0:
            raise OSError(f"cannot bind gRPC port {host}:{port}")
        self.port = bound
        # The kubelet's gRPC probes speak neither TLS nor client certificates: health alone,
        # plaintext, on a port of its own (the same servicer, so it reports the same status).
        self.health_grpc: grpc.aio.Server | None = None
        if settings.health_port:
            self.health_grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_grpc)
            address = f"{host}:{settings.health_port}"
            if self.health_grpc.add_insecure_port(address) == 0:
                raise OSError(f"cannot bind health port {address}")

    async def start(self) -> None:
        if self.http_authz is not None:
            settings = self.sidecar.config.server
            await self.http_authz.start(settings.host, settings.authz_http_port)
        await self.grpc.start()
        if self.health_grpc is not None:
            await self.health_grpc.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def not_serving(self) -> None:
        """Tell health checkers to send new work elsewhere; everything is still served."""
        if self.http_authz is not None:
            self.http_authz.serving = False
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace_s: float) -> None:
        """Stop accepting, let in-flight streams finish within ``grace_s``, flush charges."""
        await self.not_serving()
        if self.http_authz is not None:  # checks are short: nothing in flight to wait for
            await self.http_authz.stop()
        await self.grpc.stop(grace_s)
        if self.health_grpc is not None:  # answered NOT_SERVING until the streams were done
            await self.health_grpc.stop(0)
        await self.sidecar.close()


async def serve(config: Config, ready: asyncio.Event | None = None) -> None:
    """Run one worker until SIGTERM or SIGINT, then stop in order (see ``_stop``)."""
    sidecar = Sidecar.build(config)
    await sidecar.start()
    server = Server(sidecar, config.server.host, config.server.port)
    metrics_server = None
    if config.server.metrics_port:
        metrics_server, _ = serve_metrics(
            sidecar.metrics, config.server.host, config.server.metrics_port
        )
    usage_api = None
    if config.observability.usage_port:
        usage_api = UsageApi(
            sidecar.store,
            sidecar.identities,
            retention_days=config.store.retention_days,
            admin_group=config.observability.admin_group,
            groups=SUBSCRIPTION_GROUPS if config.maas.era == "subscriptions" else GROUPS,
        )
        await usage_api.start(config.server.host, config.observability.usage_port)
    await server.start()
    # Everything built so far lives as long as the process: keep the collector from walking the
    # imported modules (kubernetes, protobuf descriptors) on every full collection.
    gc.freeze()
    log.info(
        "serving grpc=%s:%d metrics=%d usage=%d store=%r",
        config.server.host,
        server.port,
        config.server.metrics_port,
        config.observability.usage_port,
        config.store.url,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        await _stop(config, server, usage_api)
        if metrics_server is not None:
            metrics_server.shutdown()
        log.info("stopped")


async def _stop(config: Config, server: Server, usage_api: UsageApi | None) -> None:
    """The graceful stop, in order; each step logs one line.

    1. Health answers NOT_SERVING; after ``server.drain_delay_s`` (Envoy's health check has moved
       new requests to the other workers by then) no new stream is accepted, and streams in
       flight may finish within the grace period.
    2. Charges still settling run to completion; the Kuadrant queue is flushed.
    3. The store closes, replaying what its spool holds.
    4. The usage API stops last: it reads the store until the end.
    """
    grace = config.server.grace_period_s
    await server.not_serving()
    if config.server.drain_delay_s:
        log.info("health NOT_SERVING: still serving for %.1fs", config.server.drain_delay_s)
        await asyncio.sleep(config.server.drain_delay_s)
    log.info("draining: no new streams, in-flight ones may finish within %.1fs", grace)
    await server.stop(grace)
    log.info("stopping the usage API")
    if usage_api is not None:
        await usage_api.stop()


def run_worker(config: Config, index: int = 0) -> None:
    """Entry point of one worker process: uvloop when installed, else asyncio's loop."""
    configure_logging(config.server.log_level, f"worker={index}")
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(config))


def worker_config(config: Config, index: int) -> Config:
    """Worker ``index`` listens on port+index, metrics_port+index, health_port+index and
    authz_http_port+index.

    Only worker 0 serves the usage API: it reads the shared store, so one listener is enough.
    Only worker 0 pushes CloudEvents too: one reader keeps them in the stream's order.
    """
    server = config.server
    metrics_port = server.metrics_port + index if server.metrics_port else 0
    health_port = server.health_port + index if server.health_port else 0
    authz_http_port = server.authz_http_port + index if server.authz_http_port else 0
    observability = config.observability
    export = config.export
    if index:
        observability = replace(observability, usage_port=0)
        export = replace(export, cloudevents=replace(export.cloudevents, url=Secret("")))
    server = replace(server, port=server.port + index, metrics_port=metrics_port, workers=1)
    return replace(
        config,
        server=replace(server, health_port=health_port, authz_http_port=authz_http_port),
        observability=observability,
        export=export,
    )


def _worker_main(config: Config, index: int) -> None:
    run_worker(worker_config(config, index), index)


def run(config: Config) -> int:
    """Run ``server.workers`` worker processes under a supervisor that restarts any that exits."""
    configure_logging(config.server.log_level, "supervisor")
    return Supervisor(config.server.workers, functools.partial(_worker_main, config)).run()
