"""Composition root: builds the store, sources, limiter and services from Config; starts and stops."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import signal
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2, external_processor_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from extproc import tls
from extproc.admission import Admission
from extproc.authz.api_keys import ApiKeyIdentities
from extproc.authz.base import AccessChecker, AllowAll, IdentitySource, TierSource
from extproc.authz.kube import KubeConnector
from extproc.authz.tiers import FileTiers
from extproc.charger import Charger
from extproc.config import Config
from extproc.envoy.authz_service import AuthorizationService
from extproc.envoy.inline_admission import InlineAdmission
from extproc.envoy.proc_service import ExternalProcessorService
from extproc.limits.limiter import Limiter
from extproc.observability.metrics import Metrics, serve_metrics
from extproc.observability.usage_api import UsageApi
from extproc.routes import RouteTable
from extproc.store.base import CounterStore
from extproc.store.memory import MemoryStore
from extproc.store.resilient import ResilientStore

if TYPE_CHECKING:
    from extproc.kuadrant.policies import PolicyLimits
    from extproc.kuadrant.reporter import Reporter

log = logging.getLogger("extproc.app")

SERVICE_NAMES = (
    external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name,
    external_processor_pb2.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name,
)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def build_inner_store(config: Config) -> CounterStore:
    """The bare store for ``store.url``, without the failure policy (for one-shot readers)."""
    url = str(config.store.url)
    if url.startswith("memory:"):
        return MemoryStore(retention_days=config.store.retention_days)
    from extproc.store.redis import RedisStore

    return RedisStore.from_config(config.store)


def build_store(config: Config, metrics: Metrics) -> ResilientStore:
    """The serving store: the bare store wrapped in the failure policy and its charge spool."""
    return ResilientStore(build_inner_store(config), config.store, metrics)


def build_identities(config: Config, metrics: Metrics, kube: KubeConnector) -> IdentitySource:
    if config.identity.source == "api_keys":
        return ApiKeyIdentities.from_file(config.path(config.identity.api_keys_file))
    from extproc.authz.kubernetes_identity import KubernetesIdentities

    return KubernetesIdentities(kube(), config.identity, metrics)


def build_tiers(config: Config, metrics: Metrics, kube: KubeConnector) -> TierSource:
    if config.tiers.source == "file":
        return FileTiers.from_file(config.path(config.tiers.file), config.tiers.instance)
    if config.tiers.source == "configmap":
        from extproc.authz.configmap_tiers import ConfigMapTiers

        return ConfigMapTiers(kube(), config.tiers, metrics)
    from extproc.authz.maas_api_tiers import MaasApiTiers

    return MaasApiTiers(config.tiers, metrics)


def build_access(config: Config, metrics: Metrics, kube: KubeConnector) -> AccessChecker:
    if config.access.check == "none":
        return AllowAll()
    from extproc.authz.access_review import SubjectAccessReviewAccess

    return SubjectAccessReviewAccess(kube(), config.access, metrics)


def build_policies(config: Config, metrics: Metrics, kube: KubeConnector) -> PolicyLimits | None:
    """Watched Kuadrant policies overlaying the configured limits (``kuadrant.policies: watch``)."""
    if config.kuadrant.policies != "watch":
        return None
    from extproc.kuadrant.policies import PolicyLimits

    return PolicyLimits(kube(), config.kuadrant, config.limits, metrics)


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
    return Reporter(settings, metrics, limits, limit_names(settings, policies))


@dataclass
class Sidecar:
    """Everything one worker process runs, wired together."""

    config: Config
    metrics: Metrics
    store: ResilientStore
    identities: IdentitySource
    tiers: TierSource
    access: AccessChecker
    admission: Admission
    authz: AuthorizationService
    proc: ExternalProcessorService
    reporter: Reporter | None = None
    policies: PolicyLimits | None = None

    @classmethod
    def build(cls, config: Config, metrics: Metrics | None = None) -> Sidecar:
        metrics = metrics or Metrics(per_user=config.observability.per_user_metrics)
        metrics.set_limits(config.limits.tiers)
        store = build_store(config, metrics)
        kube = KubeConnector.for_config(config)  # one shared client, built if needed
        identities, tiers, access = (
            build_identities(config, metrics, kube),
            build_tiers(config, metrics, kube),
            build_access(config, metrics, kube),
        )
        policies = build_policies(config, metrics, kube)
        limiter = Limiter(store, policies or config.limits, now_ms)
        routes = RouteTable(config.routes)
        admission = Admission(
            routes,
            identities,
            tiers,
            access,
            limiter,
            spoofed_headers=config.routes.spoofed_headers,
            store_failure=config.store.failure_policy,
            dependency_failure=config.identity.unavailable,
            accounting=config.accounting,
        )
        reporter = build_reporter(config, metrics, policies)
        charger = Charger(limiter, metrics, reporter)
        return cls(
            config,
            metrics,
            store,
            identities,
            tiers,
            access,
            admission,
            AuthorizationService(admission, metrics),
            ExternalProcessorService(
                charger,
                metrics,
                config.accounting,
                InlineAdmission(admission, routes, metrics)
                if config.server.admission == "ext_proc"
                else None,
            ),
            reporter,
            policies,
        )

    async def start(self) -> None:
        """Warm up what can be warmed before the first request (e.g. the store's scripts)."""
        await self.store.start()
        if self.reporter is not None:
            self.reporter.start()

    async def close(self) -> None:
        await self.proc.drain()
        if self.reporter is not None:
            await self.reporter.close()  # after the drain: the last charges are queued by now
        if self.policies is not None:
            await self.policies.close()
        for part in (self.identities, self.tiers, self.access, self.store):
            await part.close()


class Server:
    """A grpc.aio server with the sidecar's services and health on one port, reflection and TLS
    as configured (``server.reflection``, ``server.tls``), and health alone on a plaintext
    ``server.health_port`` if one is set."""

    def __init__(self, sidecar: Sidecar, host: str, port: int) -> None:
        self.sidecar = sidecar
        settings = sidecar.config.server
        # so_reuseport off: a second server must fail to bind, not silently share the port.
        options: list[tuple[str, Any]] = [
            ("grpc.so_reuseport", 0),
            ("grpc.max_concurrent_streams", 10_000),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        self.grpc = grpc.aio.server(options=options, interceptors=tls.interceptors(settings.tls))
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(sidecar.authz, self.grpc)
        external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(sidecar.proc, self.grpc)
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
        await self.grpc.start()
        if self.health_grpc is not None:
            await self.health_grpc.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_s: float) -> None:
        """Stop accepting, let in-flight streams finish within ``grace_s``, flush charges."""
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc.stop(grace_s)
        if self.health_grpc is not None:  # answered NOT_SERVING until the streams were done
            await self.health_grpc.stop(0)
        await self.sidecar.close()


async def serve(config: Config, ready: asyncio.Event | None = None) -> None:
    """Run one worker until SIGTERM or SIGINT, then stop gracefully."""
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
        log.info("stopping: grace %.1fs", config.server.grace_period_s)
        if usage_api is not None:
            await usage_api.stop()
        await server.stop(config.server.grace_period_s)
        if metrics_server is not None:
            metrics_server.shutdown()
        log.info("stopped")


def run_worker(config: Config) -> None:
    """Entry point of one worker process: uvloop when installed, else asyncio's loop."""
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(config))


def worker_config(config: Config, index: int) -> Config:
    """Worker ``index`` listens on port+index, metrics_port+index and health_port+index.

    Only worker 0 serves the usage API: it reads the shared store, so one listener is enough.
    """
    server = config.server
    metrics_port = server.metrics_port + index if server.metrics_port else 0
    health_port = server.health_port + index if server.health_port else 0
    observability = config.observability
    if index:
        observability = replace(observability, usage_port=0)
    server = replace(server, port=server.port + index, metrics_port=metrics_port, workers=1)
    return replace(
        config, server=replace(server, health_port=health_port), observability=observability
    )


def run(config: Config) -> int:
    """Run ``server.workers`` worker processes, each on its own port; forward SIGTERM to them."""
    if config.server.workers == 1:
        run_worker(config)
        return 0
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=run_worker, args=(worker_config(config, i),), name=f"worker-{i}")
        for i in range(config.server.workers)
    ]
    for process in workers:
        process.start()

    def forward(signum: int, _frame: object) -> None:
        for process in workers:
            if process.pid is not None and process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    import os

                    os.kill(process.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for process in workers:
        process.join()
    return max((process.exitcode or 0) for process in workers)
