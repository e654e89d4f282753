"""Real redis-server processes for tests: a standalone server and a three-master Redis Cluster."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tls_fixtures import openssl_binary
from tests.tools import missing_tool

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
_START_TIMEOUT_S = 10.0


def require_redis() -> tuple[str, str]:
    if REDIS_SERVER is None or REDIS_CLI is None:
        missing_tool(
            "redis-server / redis-cli not installed: the Redis store tests need a real server"
        )
    return REDIS_SERVER, REDIS_CLI


def free_port(also_free: int = 0) -> int:
    """A free loopback port; with ``also_free``, port + also_free must be free too (cluster bus)."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if not also_free:
            return port
        if port + also_free < 65536 and _bindable(port + also_free):
            return port
    raise RuntimeError("no free port pair found")


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _answers(cli: str, port: int, *command: str) -> str:
    done = subprocess.run(
        [cli, "-h", "127.0.0.1", "-p", str(port), *command],
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    )
    return done.stdout


class RedisServer:
    """One redis-server on a fixed loopback port; it can be stopped and started again on that port."""

    def __init__(self, workdir: Path, port: int = 0, *extra: str) -> None:
        self.server, self.cli = require_redis()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            self.server,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            *self.extra,
        ]
        log = (self.workdir / "redis.log").open("ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited, see {self.workdir / 'redis.log'}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not listen on {self.port}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        """Stop and start on the same port (no persistence: the data is gone)."""
        self.stop()
        self.start()

    def cli_command(self, *command: str) -> str:
        return _answers(self.cli, self.port, *command)


class RedisClusterProcesses:
    """Three masters with ``--cluster-enabled yes``, joined by ``redis-cli --cluster create``."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.nodes: list[RedisServer] = []
        for index in range(masters):
            port = free_port(also_free=10000)
            node_dir = workdir / f"node{index}"
            self.nodes.append(
                RedisServer(
                    node_dir,
                    port,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(node_dir / "nodes.conf"),
                    "--cluster-node-timeout",
                    "2000",
                )
            )

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports) + "/"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        cli = self.nodes[0].cli
        addresses = [f"127.0.0.1:{port}" for port in self.ports]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            timeout=30,
            check=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if all(
                "cluster_state:ok" in node.cli_command("cluster", "info") for node in self.nodes
            ):
                return
            time.sleep(0.1)
        raise RuntimeError("redis cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A standalone redis-server for the whole session (tests flush what they use)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A standalone redis-server for one test, free to stop and restart."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    """A three-master Redis Cluster on loopback for the whole session."""
    require_redis()
    cluster = RedisClusterProcesses(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


class RedisSentinel:
    """One redis-sentinel watching a master (quorum 1), for the redis+sentinel:// scheme."""

    def __init__(self, workdir: Path, master_port: int, service: str = "mymaster") -> None:
        self.server, self.cli = require_redis()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.service = service
        self.master_port = master_port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        conf = self.workdir / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.workdir}\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.master_port} 1\n"
        )
        log = (self.workdir / "sentinel.log").open("ab")
        self.process = subprocess.Popen(
            [self.server, str(conf), "--sentinel"], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            reply = _answers(
                self.cli, self.port, "sentinel", "get-master-addr-by-name", self.service
            )
            if str(self.master_port) in reply:
                return
            time.sleep(0.05)
        raise RuntimeError("redis-sentinel did not come up")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=5)
            self.process = None


def self_signed_cert(workdir: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 and its key, made with the openssl CLI."""
    openssl = openssl_binary()
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        capture_output=True,
        timeout=30,
        check=True,
    )  # fmt: skip
    return cert, key
