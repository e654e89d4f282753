"""Configuration: one YAML file plus MAAS_EXTPROC_* overrides, validated once into frozen dataclasses.

``load(path, environ)`` is the only entry point. Every error is a ``ConfigError`` naming the key
(``limits.tiers.free.tokens``) and the value expected. Secrets (the Redis URL's password) are
redacted in every repr.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import yaml

from extproc.accounting.pricing import (
    BILLED_KINDS,
    ModelPrices,
    PriceBook,
    Prices,
    per_million_micros,
)
from extproc.domain import Limits
from extproc.errors import ConfigError
from extproc.limits.budgets import AlertsConfig, Budget, check_era, parse_alerts, parse_budgets

ENV_PREFIX = "MAAS_EXTPROC_"

_T = TypeVar("_T")

DEFAULT_LIMITS: dict[str, Limits] = {
    "free": Limits(requests=5, requests_window_s=120, tokens=100, tokens_window_s=60),
    "premium": Limits(requests=20, requests_window_s=120, tokens=50_000, tokens_window_s=60),
    "enterprise": Limits(requests=50, requests_window_s=120, tokens=100_000, tokens_window_s=60),
}


DEFAULT_MAX_REQUEST_TOKENS = 1_000_000


class Secret(str):
    """A string whose repr never shows its value (URLs keep their shape, passwords are masked)."""

    def __repr__(self) -> str:
        return repr(redact_url(str(self)))

    __str__ = str.__str__


class HiddenText(str):
    """A string whose repr never shows its value at all (a header that carries a token)."""

    def __repr__(self) -> str:
        return "'***'"

    __str__ = str.__str__


def redact_url(url: str) -> str:
    """The URL with any credentials masked; works on host lists (``h1:1,h2:2``) too."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    return f"{scheme}{sep}{netloc}{slash}{tail}"


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS on the gRPC port (README "TLS on the gRPC port"); off while ``cert_file`` is empty."""

    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""  # set: clients must present a certificate signed by this CA
    require_client_cert: bool = False  # parsed: defaults to true when client_ca_file is set
    # Subject alternative names (a SPIFFE URI, a DNS name) of which a client certificate must
    # carry one; empty: any certificate client_ca_file signed.
    client_names: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 9000
    workers: int = 1
    metrics_port: int = 9090  # 0: no metrics endpoint
    grace_period_s: float = 10.0
    # On SIGTERM, health answers NOT_SERVING for this long while everything is still served, so
    # Envoy's health check moves new streams away before the server stops accepting them. In a
    # pod, the preStop sleep does this job instead.
    drain_delay_s: float = 0.0
    log_level: str = "info"
    # Where admission runs: ext_authz Check (default), or inside the ext_proc stream (no
    # ext_authz filter: one gRPC stream per request instead of a unary call plus a stream).
    admission: Literal["ext_authz", "ext_proc"] = "ext_authz"
    reflection: bool = True  # gRPC server reflection on the gRPC port (off in deploy/)
    # A plaintext port serving grpc.health.v1 only, for probes that cannot speak (m)TLS such as
    # the kubelet's; 0: off (health is always served on the gRPC port too).
    health_port: int = 0
    # ext_authz over HTTP/1.1 on this port as well (0: off): the same admission at a fraction of
    # a gRPC Check's CPU (extproc/envoy/http_authz.py; the `lean` layout), and the settle
    # filter's POST /settle. TLS as server.tls when that is set, else plaintext.
    authz_http_port: int = 0
    tls: TlsConfig = field(default_factory=TlsConfig)


@dataclass(frozen=True, slots=True)
class MaasConfig:
    """Which MaaS the sidecar serves: the tier era (the seed guide) or subscriptions (RHOAI 3.4+)."""

    era: Literal["tiers", "subscriptions"] = "tiers"


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    # maas_api_keys (subscription era): sk-oai-* keys validated by maas-api, other bearer tokens
    # by ``tokens``.
    source: Literal["api_keys", "kubernetes", "maas_api_keys"] = "api_keys"
    tokens: Literal["kubernetes", "api_keys"] = "kubernetes"  # maas_api_keys: other bearers
    api_keys_file: str = ""
    audiences: tuple[str, ...] = ("maas-default-gateway-sa",)
    cache_ttl_s: float = 600.0
    negative_cache_ttl_s: float = 10.0
    non_service_account: Literal["username", "reject"] = "username"
    kubeconfig: str = ""  # empty: in-cluster config, else this file
    unavailable: Literal["fail_closed", "fail_open"] = "fail_closed"


@dataclass(frozen=True, slots=True)
class TiersConfig:
    source: Literal["file", "configmap", "maas_api"] = "file"
    file: str = ""
    instance: str = "maas-default-gateway"
    configmap_namespace: str = "maas-api"
    configmap_name: str = "tier-to-group-mapping"
    maas_api_url: str = "http://maas-api.maas-api.svc.cluster.local:8080"
    # https maas_api_url: the CA bundle (PEM) that signed maas-api's certificate, e.g. OpenShift's
    # service CA on Open Data Hub; "" trusts the system's CAs.
    maas_api_ca_file: str = ""
    cache_ttl_s: float = 300.0


@dataclass(frozen=True, slots=True)
class SubscriptionsConfig:
    """The subscription era (``maas.era: subscriptions``): API keys, selection, headers."""

    # watch: MaaSSubscription, MaaSAuthPolicy and MaaSModelRef watched, selection done here as
    # maas-api does it; maas_api: POST /internal/v1/subscriptions/select.
    selection: Literal["watch", "maas_api"] = "watch"
    # Where MaaSSubscriptions and MaaSAuthPolicies live (maas-api's MAAS_SUBSCRIPTION_NAMESPACE);
    # MaaSModelRefs are watched in every namespace, as maas-api does.
    namespace: str = "models-as-a-service"
    maas_api_url: str = "https://maas-api.opendatahub.svc.cluster.local:8443"
    maas_api_ca_file: str = ""  # the CA bundle (PEM) that signed maas-api's certificate
    api_key_cache_ttl_s: float = 60.0  # a validated key is trusted this long (Authorino: 60 s)
    api_key_negative_cache_ttl_s: float = 10.0
    select_cache_ttl_s: float = 60.0  # selection: maas_api answers are kept this long
    timeout_s: float = 2.0  # per maas-api call
    # Inject X-MaaS-Username and X-MaaS-Group. Off behind MaaS's own gateway AuthPolicy, which
    # refuses any request that carries them before it injects its own (our filters run first).
    identity_headers: bool = True


@dataclass(frozen=True, slots=True)
class AccessConfig:
    check: Literal["none", "subject_access_review"] = "none"
    cache_ttl_s: float = 60.0
    # Body-model routes (POST /v1/chat/completions with only a body `model`): "<ns>/<name>" to check
    # against, by model name; models not listed skip the check.
    body_models: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    tiers: Mapping[str, Limits] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    models: Mapping[str, Mapping[str, Limits]] = field(default_factory=dict)  # tier -> model -> ...
    window: Literal["fixed", "sliding"] = "fixed"
    # Whose budget a request spends: the user's across every model ("user"), or the user's on
    # the request's model route ("route"), as Kuadrant counts (one limit per HTTPRoute).
    scope: Literal["user", "route"] = "user"
    default_reservation_tokens: int = 256
    reservation_tokens: Mapping[str, int] = field(default_factory=dict)  # per tier
    # The largest token count believed anywhere: a client's max_tokens above it is a 400, an
    # upstream's usage count above it is not trusted. Integers beyond it never reach a counter.
    max_request_tokens: int = DEFAULT_MAX_REQUEST_TOKENS
    # Budgets beside the rolling windows: calendar quotas, shared scopes, cost, soft and shadow
    # (README "Budgets and quotas"); none configured costs admission nothing.
    budgets: tuple[Budget, ...] = ()
    alerts: AlertsConfig = field(default_factory=AlertsConfig)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: Secret = Secret("memory://")  # noqa: RUF009 - an immutable str subclass
    failure_policy: Literal["fail_open", "fail_closed"] = "fail_open"
    spool_size: int = 10_000
    retention_days: int = 90
    timeout_s: float = 0.5
    # How long a settle's id is remembered (at least the longest token window is used): a replay
    # of the same settle within it is ignored, and the spool never replays anything older.
    dedupe_ttl_s: int = 3600


@dataclass(frozen=True, slots=True)
class AccountingConfig:
    inject_include_usage: bool = True  # ask streams for usage when the client did not
    hide_injected_usage: bool = False  # drop that usage chunk before it reaches the client
    chars_per_token: float = 4.0  # estimates: characters of text per token
    max_body_bytes: int = 8 << 20  # JSON bodies kept whole up to this; beyond, a bounded tail
    # A gzip / deflate body inflating past this many times its compressed size (or past
    # max_body_bytes) is a decompression bomb: decoding stops, its usage is not trusted.
    max_decompression_ratio: int = 100
    # At the end of a response, how long its last reply waits for the charge to land before it
    # goes anyway; the charge itself always runs to completion (or to the spool).
    settle_wait_s: float = 0.1


@dataclass(frozen=True, slots=True)
class RoutesConfig:
    charged_suffixes: tuple[str, ...] = (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/messages",
        "/v1/responses",
    )
    exempt_suffixes: tuple[str, ...] = ("/v1/models",)
    spoofed_headers: Literal["strip", "reject"] = "strip"
    # A path under a model prefix that is neither charged nor exempt (or has no single reading):
    # refused (404 / 400), or passed authenticated but unbilled.
    unclassified: Literal["refuse", "pass"] = "refuse"


@dataclass(frozen=True, slots=True)
class ObservabilityConfig:
    per_user_metrics: bool = False  # a `user` label on token and request metrics (opt-in)
    usage_port: int = 8081  # the usage query API (worker 0 only); 0: off
    admin_group: str = "maas-admins"  # members may read every user's usage


@dataclass(frozen=True, slots=True)
class KuadrantConfig:
    """Feeding Kuadrant's Limitador (README "Feeding Kuadrant")."""

    mode: Literal["off", "gaps", "all"] = "off"  # gaps: only what the wasm filter charges 0
    limitador_grpc: str = "limitador-limitador.kuadrant-system.svc:8081"
    limitador_http: str = "http://limitador-limitador.kuadrant-system.svc:8080"
    policy_namespace: str = "openshift-ingress"  # the TokenRateLimitPolicy whose limits we feed
    policy_name: str = "gateway-token-rate-limits"
    limit_name_template: str = "{tier}-user-tokens"  # the policy's limit for a tier ...
    limit_names: tuple[tuple[str, str], ...] = ()  # ... unless named here (tier -> limit name)
    route_template: str = "{namespace}/{name}-kserve-route"  # HTTPRoute of /<ns>/<name>/v1/...
    # Body-model routes (POST /v1/... with the model in the body): each model's own HTTPRoute,
    # watched (httproutes: watch), else named here (model -> "<namespace>/<name>"), else
    # default_route.
    model_routes: tuple[tuple[str, str], ...] = ()
    default_route: str = ""  # "<namespace>/<name>" of the HTTPRoute for body-model routes
    httproutes: Literal["off", "watch"] = "off"  # watch KServe's llminferenceservice-router routes
    model_header: str = "X-Gateway-Model-Name"  # the header KServe's model-routing rules match
    counter_expression: str = "auth.identity.userid"
    batch_interval_s: float = 0.2  # hits are summed per counter this long before one Report
    queue_size: int = 10_000  # charges waiting to be reported; beyond, the newest are dropped
    refresh_s: float = 30.0  # how long a domain's discovered limits are trusted
    timeout_s: float = 2.0  # per Report and per limits lookup
    flush_timeout_s: float = 5.0  # on shutdown: how long to keep delivering what is queued
    policies: Literal["off", "watch"] = "off"  # watch: per-tier limits from the cluster's policies


@dataclass(frozen=True, slots=True)
class ExportStreamConfig:
    """``export.stream``: every settled charge's record in a Redis Stream (README "Export")."""

    enabled: bool = True
    key: str = "maas:export"  # on Redis Cluster, the prefix of one stream per hash slot
    # Approximate cap (XADD MAXLEN ~): the oldest records go first; 0: never trimmed.
    maxlen: int = 250_000  # about 350-500 bytes of Redis memory each: 90-125 MB when full


@dataclass(frozen=True, slots=True)
class CloudEventsConfig:
    """``export.cloudevents``: records pushed as CloudEvents over HTTP; off while ``url`` is empty."""

    url: Secret = Secret("")  # noqa: RUF009 - an immutable str subclass; credentials redacted
    source: str = "/maas-extproc"
    type: str = "io.maas.usage.charge.v1"
    group: str = "cloudevents"  # the stream's consumer group the pusher reads with
    consumer: str = ""  # "": the host name (stable across restarts of a pod's sidecar)
    timeout_s: float = 5.0  # per POST
    concurrency: int = 8  # POSTs in flight at once (1: strictly in the stream's order)
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0
    spool_size: int = 1000  # records read ahead and held in memory; the stream keeps the rest
    claim_idle_s: float = 60.0  # another consumer's record undelivered this long is taken over
    from_start: bool = False  # a new group starts at the oldest retained record, not the newest


@dataclass(frozen=True, slots=True)
class ExportConfig:
    stream: ExportStreamConfig = field(default_factory=ExportStreamConfig)
    cloudevents: CloudEventsConfig = field(default_factory=CloudEventsConfig)


@dataclass(frozen=True, slots=True)
class OtlpConfig:
    """Where the ``gen_ai`` metrics go (README "Telemetry"); off while ``endpoint`` is empty."""

    # http/protobuf: the collector's base URL (``/v1/metrics`` is appended) or the full metrics
    # URL; grpc: http://host:port (plaintext) or https://host:port.
    endpoint: str = ""
    protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"
    interval_s: float = 30.0  # between two exports
    timeout_s: float = 10.0  # per export
    # Sent with every export (e.g. an authorization header); values are redacted in reprs.
    # Unset: the exporter reads OTEL_EXPORTER_OTLP_HEADERS, so a Secret can provide them.
    headers: tuple[tuple[str, HiddenText], ...] = ()


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """OpenTelemetry metrics pushed over OTLP beside the Prometheus endpoint."""

    otlp: OtlpConfig = field(default_factory=OtlpConfig)
    service_name: str = "maas-extproc"
    resource_attributes: tuple[tuple[str, str], ...] = ()  # e.g. deployment.environment.name


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    maas: MaasConfig = field(default_factory=MaasConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    tiers: TiersConfig = field(default_factory=TiersConfig)
    subscriptions: SubscriptionsConfig = field(default_factory=SubscriptionsConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    routes: RoutesConfig = field(default_factory=RoutesConfig)
    accounting: AccountingConfig = field(default_factory=AccountingConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    kuadrant: KuadrantConfig = field(default_factory=KuadrantConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    pricing: PriceBook = field(default_factory=PriceBook)  # README "Token kinds and cost"
    export: ExportConfig = field(default_factory=ExportConfig)
    base_dir: str = "."  # relative file paths resolve against the config file's folder

    def path(self, value: str) -> Path:
        """A configured file path, resolved against the config file's folder."""
        candidate = Path(value)
        return candidate if candidate.is_absolute() else Path(self.base_dir) / candidate


# ----------------------------------------------------------------------------------------- parse


def load(path: str | Path | None, environ: Mapping[str, str], *, serving: bool = True) -> Config:
    """Read ``path`` (None: defaults only), apply ``MAAS_EXTPROC_*`` overrides, validate.

    ``serving=False`` is for commands that only read the store (``usage``): the identity and tier
    files a server needs are then not required.
    """
    raw: dict[str, Any] = {}
    base_dir = "."
    if path is not None:
        file = Path(path)
        try:
            loaded = yaml.safe_load(file.read_text())
        except OSError as exc:
            raise ConfigError(str(file), "a readable YAML file", exc.strerror) from exc
        except yaml.YAMLError as exc:
            raise ConfigError(str(file), f"valid YAML ({exc})") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("(top level)", "a mapping of sections", type(loaded).__name__)
        raw = loaded or {}
        base_dir = str(file.resolve().parent)
    _apply_environ(raw, environ)
    return parse(raw, base_dir, serving=serving)


def parse(raw: Mapping[str, Any], base_dir: str = ".", *, serving: bool = True) -> Config:
    _no_unknown(raw, "", {f.name for f in fields(Config)} - {"base_dir"})
    config = Config(
        server=_server(raw.get("server")),
        maas=_section(MaasConfig, raw, "maas"),
        identity=_section(IdentityConfig, raw, "identity"),
        tiers=_section(TiersConfig, raw, "tiers"),
        subscriptions=_section(SubscriptionsConfig, raw, "subscriptions"),
        access=_access(raw.get("access")),
        limits=_limits(raw.get("limits")),
        store=_section(StoreConfig, raw, "store"),
        routes=_section(RoutesConfig, raw, "routes"),
        accounting=_section(AccountingConfig, raw, "accounting"),
        observability=_section(ObservabilityConfig, raw, "observability"),
        kuadrant=_kuadrant(raw.get("kuadrant")),
        telemetry=_telemetry(raw.get("telemetry")),
        pricing=_pricing(raw.get("pricing")),
        export=_export(raw.get("export")),
        base_dir=base_dir,
    )
    _check(config, serving)
    return config


def _apply_environ(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    """``MAAS_EXTPROC_<SECTION>_<KEY>`` sets a scalar setting; unknown names are an error."""
    simple = {
        "server": ServerConfig,
        "maas": MaasConfig,
        "identity": IdentityConfig,
        "tiers": TiersConfig,
        "subscriptions": SubscriptionsConfig,
        "access": AccessConfig,
        "store": StoreConfig,
        "routes": RoutesConfig,
        "accounting": AccountingConfig,
        "kuadrant": KuadrantConfig,
        "observability": ObservabilityConfig,
    }
    known: dict[str, tuple[str, ...]] = {}
    for section, cls in simple.items():
        for f in fields(cls):
            if f.name != "tls":  # a section of its own: MAAS_EXTPROC_SERVER_TLS_<KEY>
                known[f"{ENV_PREFIX}{section}_{f.name}".upper()] = (section, f.name)
    for f in fields(TlsConfig):
        known[f"{ENV_PREFIX}SERVER_TLS_{f.name}".upper()] = ("server", "tls", f.name)
    for f in fields(OtlpConfig):
        if f.name != "headers":  # a mapping; OTEL_EXPORTER_OTLP_HEADERS covers the environment
            known[f"{ENV_PREFIX}TELEMETRY_OTLP_{f.name}".upper()] = ("telemetry", "otlp", f.name)
    known[f"{ENV_PREFIX}TELEMETRY_SERVICE_NAME"] = ("telemetry", "service_name")
    known[f"{ENV_PREFIX}LIMITS_WINDOW"] = ("limits", "window")
    known[f"{ENV_PREFIX}LIMITS_SCOPE"] = ("limits", "scope")
    known[f"{ENV_PREFIX}LIMITS_MAX_REQUEST_TOKENS"] = ("limits", "max_request_tokens")
    for part, part_cls in (("stream", ExportStreamConfig), ("cloudevents", CloudEventsConfig)):
        for f in fields(part_cls):
            known[f"{ENV_PREFIX}EXPORT_{part}_{f.name}".upper()] = ("export", part, f.name)
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        if name not in known:
            raise ConfigError(name, "a known setting, e.g. MAAS_EXTPROC_STORE_URL")
        *sections, key = known[name]
        target = raw
        for depth, section in enumerate(sections, 1):
            target = target.setdefault(section, {})
            if not isinstance(target, dict):
                raise ConfigError(".".join(sections[:depth]), "a mapping", target)
        target[key] = yaml.safe_load(value) if value else value


def _no_unknown(raw: Mapping[str, Any], prefix: str, allowed: set[str]) -> None:
    for key in raw:
        if key not in allowed:
            where = f"{prefix}{key}"
            raise ConfigError(where, "one of " + ", ".join(sorted(allowed)))


def _mapping(value: object, key: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, "a mapping", value)
    return cast(Mapping[str, Any], value)


def _section(cls: type[_T], raw: Mapping[str, Any], name: str) -> _T:
    values = _mapping(raw.get(name), name)
    defaults = cls()
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    _no_unknown(values, f"{name}.", set(known))
    out: dict[str, Any] = {}
    for key, value in values.items():
        out[key] = _coerce(f"{name}.{key}", value, getattr(defaults, key), known[key].type)
    return replace(defaults, **out)  # type: ignore[type-var]


def _coerce(key: str, value: Any, default: Any, annotation: object) -> Any:
    choices = (
        re.findall(r"['\"]([^'\"]+)['\"]", str(annotation)) if "Literal" in str(annotation) else []
    )
    if choices:
        if value not in choices:
            raise ConfigError(key, "one of " + ", ".join(choices), value)
        return value
    if isinstance(default, Secret):
        if not isinstance(value, str) or not value:
            raise ConfigError(key, "a URL string", value)
        return Secret(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(key, "true or false", value)
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(key, "a whole number >= 0", value)
        return value
    if isinstance(default, float) and key.endswith("chars_per_token"):
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(key, "a number > 0", value)
        return float(value)
    if isinstance(default, float):
        return _seconds(key, value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(key, "a string", value)
        return value
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, "a list of strings", value)
        return tuple(value)
    raise ConfigError(key, "a supported value", value)  # pragma: no cover - programming error


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def _seconds(key: str, value: object) -> float:
    """A duration: a number of seconds or a string like ``500ms``, ``30s``, ``2m``, ``1h``."""
    if isinstance(value, bool):
        raise ConfigError(key, "a duration like 30s, 2m or 1h", value)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value.strip())):
        seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    else:
        raise ConfigError(key, "a duration like 30s, 2m or 1h", value)
    if seconds < 0:
        raise ConfigError(key, "a duration >= 0", value)
    return seconds


def _whole_seconds(key: str, value: object) -> int:
    seconds = _seconds(key, value)
    if seconds < 1 or seconds != int(seconds):
        raise ConfigError(key, "a whole number of seconds >= 1, like 60s or 2m", value)
    return int(seconds)


def _tier_limits(key: str, value: object, base: Limits) -> Limits:
    values = _mapping(value, key)
    _no_unknown(values, f"{key}.", {"requests", "requests_window", "tokens", "tokens_window"})
    out = base
    for name in ("requests", "tokens"):
        if name in values:
            number = values[name]
            if isinstance(number, bool) or not isinstance(number, int) or number < 0:
                raise ConfigError(f"{key}.{name}", "a whole number >= 0 (0: unlimited)", number)
            out = replace(out, **{name: number})
        if f"{name}_window" in values:
            seconds = _whole_seconds(f"{key}.{name}_window", values[f"{name}_window"])
            out = replace(out, **{f"{name}_window_s": seconds})
    return out


# Counts stay exact as doubles (Lua numbers, Prometheus samples) below 2**53; a bound above
# that could let a sum of two trusted counts lose its last digits.
_MAX_BOUND = 2**52


def _limits(value: object) -> LimitsConfig:
    raw = _mapping(value, "limits")
    allowed = {
        "tiers",
        "models",
        "window",
        "scope",
        "default_reservation_tokens",
        "reservation_tokens",
        "max_request_tokens",
        "budgets",
        "alerts",
    }
    _no_unknown(raw, "limits.", allowed)
    defaults = LimitsConfig()
    tiers = dict(defaults.tiers)
    for name, spec in _mapping(raw.get("tiers"), "limits.tiers").items():
        tiers[name] = _tier_limits(f"limits.tiers.{name}", spec, tiers.get(name, Limits()))
    models: dict[str, dict[str, Limits]] = {}
    for tier, per_model in _mapping(raw.get("models"), "limits.models").items():
        for model, spec in _mapping(per_model, f"limits.models.{tier}").items():
            key = f"limits.models.{tier}.{model}"
            models.setdefault(tier, {})[model] = _tier_limits(key, spec, Limits())
    window = raw.get("window", defaults.window)
    if window not in ("fixed", "sliding"):
        raise ConfigError("limits.window", "fixed or sliding", window)
    scope = raw.get("scope", defaults.scope)
    if scope not in ("user", "route"):
        raise ConfigError("limits.scope", "user or route", scope)
    bound = raw.get("max_request_tokens", defaults.max_request_tokens)
    if isinstance(bound, bool) or not isinstance(bound, int) or not 1 <= bound <= _MAX_BOUND:
        raise ConfigError(
            "limits.max_request_tokens", f"a whole number from 1 to {_MAX_BOUND}", bound
        )
    within = f"a whole number from 0 to limits.max_request_tokens ({bound})"
    default_reservation = raw.get("default_reservation_tokens", defaults.default_reservation_tokens)
    if (
        isinstance(default_reservation, bool)
        or not isinstance(default_reservation, int)
        or not 0 <= default_reservation <= bound
    ):
        raise ConfigError("limits.default_reservation_tokens", within, default_reservation)
    reservations: dict[str, int] = {}
    for tier, amount in _mapping(
        raw.get("reservation_tokens"), "limits.reservation_tokens"
    ).items():
        if isinstance(amount, bool) or not isinstance(amount, int) or not 0 <= amount <= bound:
            raise ConfigError(f"limits.reservation_tokens.{tier}", within, amount)
        reservations[tier] = amount
    return LimitsConfig(
        tiers=tiers,
        models=models,
        window=window,
        scope=scope,
        default_reservation_tokens=default_reservation,
        reservation_tokens=reservations,
        max_request_tokens=bound,
        budgets=parse_budgets(raw.get("budgets")),
        alerts=parse_alerts(raw.get("alerts")),
    )


def _server(value: object) -> ServerConfig:
    raw = dict(_mapping(value, "server"))
    tls = _tls(_mapping(raw.pop("tls", None), "server.tls"))
    return replace(_section(ServerConfig, {"server": raw}, "server"), tls=tls)


def _tls(raw: Mapping[str, Any]) -> TlsConfig:
    """``server.tls``; the files themselves are read and checked by ``extproc.tls``."""
    values = dict(raw)
    require = values.pop("require_client_cert", None)
    config = _section(TlsConfig, {"server.tls": values}, "server.tls")
    if require is None:
        require = bool(config.client_ca_file)
    if not isinstance(require, bool):
        raise ConfigError("server.tls.require_client_cert", "true or false", require)
    config = replace(config, require_client_cert=require)
    if config.cert_file and not config.key_file:
        raise ConfigError("server.tls.key_file", "a key file when server.tls.cert_file is set")
    if config.key_file and not config.cert_file:
        raise ConfigError("server.tls.cert_file", "a certificate file when key_file is set")
    if config.client_ca_file and not config.cert_file:
        raise ConfigError(
            "server.tls.cert_file", "a certificate file when server.tls.client_ca_file is set"
        )
    if config.require_client_cert and not config.client_ca_file:
        raise ConfigError(
            "server.tls.require_client_cert",
            "false unless server.tls.client_ca_file names the CA of the client certificates",
            True,
        )
    if config.client_ca_file and not config.require_client_cert:
        # grpc either requires and verifies a client certificate or never asks for one.
        raise ConfigError(
            "server.tls.require_client_cert",
            "true when server.tls.client_ca_file is set (grpc cannot verify optional ones)",
            False,
        )
    if config.client_names and not config.require_client_cert:
        raise ConfigError(
            "server.tls.client_names", "empty unless server.tls.client_ca_file is set"
        )
    if any(not name for name in config.client_names):
        raise ConfigError("server.tls.client_names", "non-empty names", list(config.client_names))
    return config


def _access(value: object) -> AccessConfig:
    raw = dict(_mapping(value, "access"))
    body_models = _mapping(raw.pop("body_models", None), "access.body_models")
    config = _section(AccessConfig, {"access": raw}, "access")
    pairs: list[tuple[str, str]] = []
    for model, target in body_models.items():
        if not isinstance(target, str) or target.count("/") != 1 or target.startswith("/"):
            raise ConfigError(f"access.body_models.{model}", "a '<namespace>/<name>'", target)
        pairs.append((str(model), target))
    return replace(config, body_models=tuple(pairs))


def _kuadrant(value: object) -> KuadrantConfig:
    raw = dict(_mapping(value, "kuadrant"))
    limit_names = _mapping(raw.pop("limit_names", None), "kuadrant.limit_names")
    model_routes = _mapping(raw.pop("model_routes", None), "kuadrant.model_routes")
    for key in ("mode", "policies", "httproutes"):
        if raw.get(key) is False:  # YAML 1.1 reads a bare `off` as false
            raw[key] = "off"
    config = _section(KuadrantConfig, {"kuadrant": raw}, "kuadrant")
    pairs: list[tuple[str, str]] = []
    for tier, name in limit_names.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"kuadrant.limit_names.{tier}", "a limit name of the policy", name)
        pairs.append((str(tier), name))
    routes: list[tuple[str, str]] = []
    for model, route in model_routes.items():
        if not _namespaced_name(route):
            raise ConfigError(f"kuadrant.model_routes.{model}", "a '<namespace>/<name>'", route)
        routes.append((str(model), route))
    config = replace(config, limit_names=tuple(pairs), model_routes=tuple(routes))
    if "{tier}" not in config.limit_name_template:
        raise ConfigError(
            "kuadrant.limit_name_template", "a template with {tier}", config.limit_name_template
        )
    try:
        route = config.route_template.format(namespace="ns", name="name")
    except (KeyError, IndexError, ValueError):
        route = ""
    if route.count("/") != 1 or "{namespace}" not in config.route_template:
        raise ConfigError(
            "kuadrant.route_template",
            "'<namespace part>/<name part>' using {namespace} and {name}",
            config.route_template,
        )
    if config.default_route and not _namespaced_name(config.default_route):
        raise ConfigError("kuadrant.default_route", "'' or '<namespace>/<name>'")
    if not config.model_header:
        raise ConfigError("kuadrant.model_header", "a header name", config.model_header)
    if config.mode != "off" and not config.limitador_grpc:
        raise ConfigError("kuadrant.limitador_grpc", "host:port when kuadrant.mode is not off")
    if config.batch_interval_s <= 0:
        raise ConfigError("kuadrant.batch_interval_s", "a duration > 0", config.batch_interval_s)
    if config.queue_size < 1:
        raise ConfigError("kuadrant.queue_size", "a whole number >= 1", config.queue_size)
    return config


def _telemetry(value: object) -> TelemetryConfig:
    raw = dict(_mapping(value, "telemetry"))
    attributes = _string_pairs(
        raw.pop("resource_attributes", None), "telemetry.resource_attributes"
    )
    otlp_raw = dict(_mapping(raw.pop("otlp", None), "telemetry.otlp"))
    headers = _string_pairs(otlp_raw.pop("headers", None), "telemetry.otlp.headers")
    config = _section(TelemetryConfig, {"telemetry": raw}, "telemetry")
    otlp = _section(OtlpConfig, {"telemetry.otlp": otlp_raw}, "telemetry.otlp")
    otlp = replace(otlp, headers=tuple((name, HiddenText(text)) for name, text in headers))
    if otlp.endpoint:
        parts = urllib.parse.urlsplit(otlp.endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                "telemetry.otlp.endpoint", "'' (off) or an http:// or https:// URL", otlp.endpoint
            )
        if otlp.protocol == "grpc" and parts.path.strip("/"):
            raise ConfigError(
                "telemetry.otlp.endpoint", "scheme://host:port without a path for grpc"
            )
    for name in ("interval_s", "timeout_s"):
        if getattr(otlp, name) <= 0:
            raise ConfigError(f"telemetry.otlp.{name}", "a duration > 0", getattr(otlp, name))
    if not config.service_name:
        raise ConfigError("telemetry.service_name", "a service name", config.service_name)
    return replace(config, otlp=otlp, resource_attributes=attributes)


def _string_pairs(value: object, key: str) -> tuple[tuple[str, str], ...]:
    """A mapping of non-empty names to strings, as ordered pairs (a frozen config holds no dict)."""
    pairs: list[tuple[str, str]] = []
    for name, text in _mapping(value, key).items():
        if not isinstance(name, str) or not name or not isinstance(text, str):
            raise ConfigError(f"{key}.{name}", "a string value under a non-empty name")
        pairs.append((name, text))
    return tuple(pairs)


def _pricing(value: object) -> PriceBook:
    """``pricing``: per model (and a ``default`` for the rest), a price per million tokens for
    each token kind, with per-plan (tier, or ``<namespace>/<name>`` subscription) overrides."""
    raw = _mapping(value, "pricing")
    _no_unknown(raw, "pricing.", {"models", "default"})
    models = {
        str(model): _model_prices(f"pricing.models.{model}", spec)
        for model, spec in _mapping(raw.get("models"), "pricing.models").items()
    }
    default = raw.get("default")
    return PriceBook(
        models, _model_prices("pricing.default", default) if default is not None else None
    )


def _model_prices(key: str, value: object) -> ModelPrices:
    spec = dict(_mapping(value, key))
    _no_unknown(spec, f"{key}.", {*BILLED_KINDS, "plans"})
    plans = _mapping(spec.pop("plans", None), f"{key}.plans")
    for kind in ("input", "output"):  # the kinds every other one falls back to
        if kind not in spec:
            raise ConfigError(f"{key}.{kind}", 'a price per million tokens, e.g. "2.50"')
    prices = _prices(key, spec)
    return ModelPrices(
        prices,
        {str(plan): _prices(f"{key}.plans.{plan}", p).over(prices) for plan, p in plans.items()},
    )


def _prices(key: str, value: object) -> Prices:
    spec = _mapping(value, key)
    _no_unknown(spec, f"{key}.", set(BILLED_KINDS))
    out: dict[str, int] = {}
    for kind, price in spec.items():
        expected = 'a price per million tokens as a plain decimal string, e.g. "2.50"'
        if isinstance(price, bool) or not isinstance(price, int | str):
            raise ConfigError(
                f"{key}.{kind}", expected + " (quoted: YAML floats are binary)", price
            )
        try:
            out[kind] = per_million_micros(str(price))
        except ValueError as exc:
            raise ConfigError(f"{key}.{kind}", f"{expected} ({exc})", price) from None
    return Prices(out)


def _export(value: object) -> ExportConfig:
    raw = _mapping(value, "export")
    _no_unknown(raw, "export.", {"stream", "cloudevents"})
    stream = _section(ExportStreamConfig, {"export.stream": raw.get("stream")}, "export.stream")
    events_raw = dict(_mapping(raw.get("cloudevents"), "export.cloudevents"))
    url = events_raw.pop("url", "")  # "" (off) is a valid value here, unlike store.url
    if not isinstance(url, str):
        raise ConfigError("export.cloudevents.url", "'' or an http:// or https:// URL", url)
    events = replace(
        _section(CloudEventsConfig, {"export.cloudevents": events_raw}, "export.cloudevents"),
        url=Secret(url),
    )
    # The stream key is a prefix on Cluster (a hash tag follows it): braces would end the tag.
    if not stream.key or any(c in stream.key for c in "{}") or stream.key != stream.key.strip():
        raise ConfigError("export.stream.key", "a Redis key without braces or spaces", stream.key)
    if events.url:
        parsed = urllib.parse.urlsplit(events.url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError("export.cloudevents.url", "'' or an http:// or https:// URL")
        if not stream.enabled:
            raise ConfigError(
                "export.cloudevents.url", "'' unless export.stream.enabled (it reads the stream)"
            )
    for name in ("source", "type", "group"):
        if not getattr(events, name):
            raise ConfigError(f"export.cloudevents.{name}", "a non-empty string")
    if events.timeout_s <= 0 or events.retry_initial_s <= 0:
        raise ConfigError("export.cloudevents", "timeout_s and retry_initial_s > 0")
    if events.retry_max_s < events.retry_initial_s:
        raise ConfigError("export.cloudevents.retry_max_s", "a duration >= retry_initial_s")
    if events.spool_size < 1:
        raise ConfigError("export.cloudevents.spool_size", "a whole number >= 1")
    if events.concurrency < 1:
        raise ConfigError("export.cloudevents.concurrency", "a whole number >= 1")
    return ExportConfig(stream=stream, cloudevents=events)


def _check_subscriptions(config: Config) -> None:
    """What the subscription era replaces must not be configured as if it still applied."""
    settings = config.subscriptions
    if config.access.check != "none":
        raise ConfigError(
            "access.check", "none when maas.era is subscriptions (MaaSAuthPolicy decides access)"
        )
    if config.access.body_models:
        raise ConfigError(
            "access.body_models",
            "empty when maas.era is subscriptions (body models resolve through MaaSModelRef)",
        )
    needs_api = config.identity.source == "maas_api_keys" or settings.selection == "maas_api"
    if needs_api and not settings.maas_api_url.startswith(("https://", "http://")):
        raise ConfigError("subscriptions.maas_api_url", "an http:// or https:// URL")
    if settings.maas_api_ca_file and not settings.maas_api_url.startswith("https://"):
        raise ConfigError(
            "subscriptions.maas_api_ca_file", "empty unless subscriptions.maas_api_url is https://"
        )
    if settings.selection == "watch" and not settings.namespace:
        raise ConfigError("subscriptions.namespace", "the namespace of the MaaSSubscriptions")


def _namespaced_name(value: object) -> bool:
    """Whether ``value`` is ``<namespace>/<name>`` with both parts non-empty."""
    return isinstance(value, str) and value.count("/") == 1 and all(value.split("/"))


def _check(config: Config, serving: bool) -> None:
    """Cross-field rules that no single key can check."""
    identity = config.identity
    static_keys = identity.source == "api_keys" or (
        identity.source == "maas_api_keys" and identity.tokens == "api_keys"
    )
    if serving and static_keys and not identity.api_keys_file:
        raise ConfigError(
            "identity.api_keys_file", "a file path when identity.source (or .tokens) is api_keys"
        )
    check_era(config.limits.budgets, config.maas.era)
    if config.maas.era == "subscriptions":
        _check_subscriptions(config)
    elif identity.source == "maas_api_keys":
        raise ConfigError("identity.source", "maas_api_keys only when maas.era is subscriptions")
    elif serving and config.tiers.source == "file" and not config.tiers.file:
        raise ConfigError("tiers.file", "a file path when tiers.source is file")
    if config.server.workers < 1:
        raise ConfigError("server.workers", "a whole number >= 1", config.server.workers)
    if not 0 < config.server.port < 65536:
        raise ConfigError("server.port", "a port from 1 to 65535", config.server.port)
    if config.server.metrics_port > 65535:
        raise ConfigError("server.metrics_port", "a port from 0 to 65535")
    if config.server.health_port > 65535 or config.server.health_port == config.server.port:
        raise ConfigError(
            "server.health_port", "0 or a port from 1 to 65535 other than server.port"
        )
    if config.server.authz_http_port > 65535 or config.server.authz_http_port == config.server.port:
        raise ConfigError(
            "server.authz_http_port", "0 or a port from 1 to 65535 other than server.port"
        )
    if config.observability.usage_port > 65535:
        raise ConfigError("observability.usage_port", "a port from 0 to 65535")
    scheme = urllib.parse.urlsplit(str(config.store.url)).scheme
    if scheme not in (
        "memory",
        "redis",
        "rediss",
        "redis+cluster",
        "rediss+cluster",
        "redis+sentinel",
    ):
        raise ConfigError(
            "store.url",
            "memory://, redis://, rediss:// (or +cluster / +sentinel)",
            redact_url(str(config.store.url)),
        )
    if config.tiers.maas_api_ca_file and not config.tiers.maas_api_url.startswith("https://"):
        raise ConfigError("tiers.maas_api_ca_file", "empty unless tiers.maas_api_url is https://")
    if config.store.spool_size < 1:
        raise ConfigError("store.spool_size", "a whole number >= 1", config.store.spool_size)
    if config.store.retention_days < 1:
        raise ConfigError("store.retention_days", "a whole number >= 1")
    if config.accounting.max_decompression_ratio < 1:
        raise ConfigError(
            "accounting.max_decompression_ratio",
            "a whole number >= 1",
            config.accounting.max_decompression_ratio,
        )
    if config.accounting.hide_injected_usage and not config.accounting.inject_include_usage:
        raise ConfigError(
            "accounting.hide_injected_usage", "false unless accounting.inject_include_usage is true"
        )
    for suffix in (*config.routes.charged_suffixes, *config.routes.exempt_suffixes):
        if not suffix.startswith("/"):
            raise ConfigError("routes", "path suffixes starting with /", suffix)
