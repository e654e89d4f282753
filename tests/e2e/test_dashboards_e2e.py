"""Every dashboard query, run by a real Prometheus scraping a real stack, returns data.

The stack authenticates with TokenReview against the Kubernetes emulator (so the identity cache has
lookups to show) and runs with ``observability.per_user_metrics`` on (so the per-user dashboard has
its ``user`` label).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from extproc.stack import LocalStack, free_port, wait_for_port
from tests.helpers import CHAT
from tests.k8s_emulator import KubeEmulator
from tests.tools import require_tool
from tests.unit.test_dashboards import dashboard_exprs

pytestmark = pytest.mark.e2e

TIERS = """\
- {name: free, level: 0, groups: [tier-free-users]}
- {name: premium, level: 1, groups: [tier-premium-users]}
- {name: enterprise, level: 2, groups: [tier-enterprise-users]}
"""
# Grafana's variables, made concrete for Prometheus.
VARIABLES = {"$__rate_interval": "1m", "$__range": "5m", "$user": "alice", "$tier": "free"}


class Prometheus:
    """A prometheus server on a free loopback port, scraping ``targets`` every second."""

    def __init__(self, workdir: Path, targets: list[int]) -> None:
        self.binary = require_tool(
            "prometheus", "prometheus not installed (apt-get install prometheus)"
        )
        self.workdir = workdir
        self.port = free_port()
        self.targets = targets
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "maas-extproc",
                    "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in self.targets]}],
                }
            ],
        }
        config_file = self.workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        log = (self.workdir / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [
                self.binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for_port(self.port, 30, self.process)
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}
        )
        with urllib.request.urlopen(url, timeout=10) as response:
            answer: dict[str, Any] = json.loads(response.read())
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def log(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[KubeEmulator]:
    workdir = tmp_path / "kube"
    workdir.mkdir()
    with KubeEmulator(workdir) as server:
        server.set_config_map("maas-api", "tier-to-group-mapping", {"tiers": TIERS})
        yield server


@pytest.fixture
def stack(emulator: KubeEmulator, tmp_path: Path) -> Iterator[LocalStack]:
    config = tmp_path / "config.yaml"
    kubeconfig = str(emulator.write_kubeconfig())
    config.write_text(
        yaml.safe_dump(
            {
                "identity": {"source": "kubernetes", "kubeconfig": kubeconfig},
                "tiers": {"source": "configmap"},
            }
        )
    )
    env = {"MAAS_EXTPROC_OBSERVABILITY_PER_USER_METRICS": "true"}
    with LocalStack(config_path=config, log_dir=tmp_path, env=env) as running:
        yield running


@pytest.fixture
def prometheus(stack: LocalStack, tmp_path: Path) -> Iterator[Prometheus]:
    server = Prometheus(tmp_path, stack.metrics_ports)
    try:
        yield server.start()
    finally:
        server.stop()


def run_load(stack: LocalStack, emulator: KubeEmulator) -> dict[int, int]:
    """Some dozens of requests across tiers: 200s, 429s past the free limit, a 401, a disconnect."""
    tokens = {
        "alice": emulator.add_sa_token("maas-default-gateway-tier-free", "alice"),
        "bob": emulator.add_sa_token("maas-default-gateway-tier-premium", "bob"),
        "carol": emulator.add_sa_token("maas-default-gateway-tier-enterprise", "carol"),
    }
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        for round_ in range(8):
            for user, token in [*tokens.items(), ("nobody", "not-a-token")]:
                body = {
                    "model": f"model-{round_ % 2}",
                    "max_tokens": 5,
                    "messages": [{"role": "user", "content": f"hello from {user}"}],
                }
                response = client.post(
                    CHAT, json=body, headers={"Authorization": f"Bearer {token}"}
                )
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        body = {
            "model": "model-0",
            "max_tokens": 40,
            "stream": True,
            "messages": [{"role": "user", "content": "a long story"}],
        }
        headers = {"Authorization": f"Bearer {tokens['bob']}", "x-sim-delay-ms": "30"}
        with client.stream("POST", CHAT, json=body, headers=headers) as stream:
            assert stream.status_code == 200
            next(stream.iter_lines())  # leave after the first event: a disconnect
    return statuses


def concrete(expr: str) -> str:
    for variable, value in VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def test_every_dashboard_query_returns_data(
    stack: LocalStack, emulator: KubeEmulator, prometheus: Prometheus
) -> None:
    statuses = run_load(stack, emulator)
    assert statuses[200] > 0
    assert statuses[429] > 0
    assert statuses[401] > 0
    queries = sorted({concrete(expr) for _, expr in dashboard_exprs()})
    empty = queries
    # Wait for scrapes to pick the load up; the deadline only guards against a hang.
    deadline = time.monotonic() + 45
    while empty and time.monotonic() < deadline:
        empty = [expr for expr in empty if not prometheus.query(expr)]
        if empty:
            time.sleep(0.5)
    assert not empty, f"queries without data: {empty}\nup: {prometheus.query('up')}"
