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

from extproc.accounting.pricing import BILLED_KINDS
from extproc.stack import LocalStack, free_port, wait_for_port
from tests.helpers import CHAT
from tests.k8s_emulator import KubeEmulator
from tests.tools import require_tool
from tests.unit.test_dashboards import dashboard_exprs, dashboard_panels

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
                # Every model priced (per million tokens): the cost panels have data.
                "pricing": {
                    "default": {
                        "input": "2.50",
                        "cached_input": "1.25",
                        "cache_creation": "3.75",
                        "output": "10.00",
                        "reasoning": "10.00",
                    }
                },
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


# Every token kind, served by the simulator in each API's documented shape.
KINDS = {
    "x-sim-cached-tokens": "64",
    "x-sim-cache-write-tokens": "20",
    "x-sim-reasoning-tokens": "16",
}


def user_tokens(emulator: KubeEmulator) -> dict[str, str]:
    return {
        "alice": emulator.add_sa_token("maas-default-gateway-tier-free", "alice"),
        "bob": emulator.add_sa_token("maas-default-gateway-tier-premium", "bob"),
        "carol": emulator.add_sa_token("maas-default-gateway-tier-enterprise", "carol"),
    }


def warm_up(stack: LocalStack, prometheus: Prometheus, tokens: dict[str, str]) -> None:
    """One request per user, scraped before the load: a counter's first sample is not an
    increase, so the load's increments must land on series Prometheus already has."""
    body = {"model": "model-0", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        for token in tokens.values():
            headers = {"Authorization": f"Bearer {token}"}
            assert client.post(CHAT, json=body, headers=headers).status_code == 200
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        seen = prometheus.query("count(maas_cost_micros_total) + count(maas_token_kind_total)")
        if seen and float(seen[0]["value"][1]) >= len(tokens) * 6:  # five kinds and the cost
            return
        time.sleep(0.2)
    raise AssertionError(f"no first scrape of the users' series: {seen}")


def run_load(stack: LocalStack, tokens: dict[str, str]) -> dict[int, int]:
    """Some dozens of requests across tiers: 200s, 429s past the free limit, a 401, a disconnect,
    and responses with cached, cache-written and reasoning tokens."""
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
        rich = {"Authorization": f"Bearer {tokens['carol']}"}
        body = {
            "model": "model-0",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}],
        }
        assert client.post(CHAT, json=body, headers={**rich, **KINDS}).status_code == 200
        messages = CHAT.replace("/chat/completions", "/messages")
        assert client.post(messages, json=body, headers={**rich, **KINDS}).status_code == 200
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
    tokens = user_tokens(emulator)
    warm_up(stack, prometheus, tokens)
    statuses = run_load(stack, tokens)
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
    check_token_kind_and_cost_panels(prometheus)


def nonzero(prometheus: Prometheus, expr: str, label: str) -> set[str]:
    """The values of ``label`` among the series of ``expr`` that are above 0."""
    return {
        row["metric"].get(label, "")
        for row in prometheus.query(concrete(expr))
        if float(row["value"][1]) > 0
    }


def panel_expr(title: str) -> str:
    """The (first) query of the dashboard panel named ``title``."""
    found = [expr for name, expr in dashboard_panels() if name == title]
    assert found, title
    return found[0]


def check_token_kind_and_cost_panels(prometheus: Prometheus) -> None:
    """The new panels show the expected series, not just any: every kind, cost per plan and
    model, the users by cost."""
    expected = [
        ("Tokens per second by kind", "kind", set(BILLED_KINDS)),
        ("Cached share of input tokens by model", "model", {"other"}),
        ("Cost per hour by plan", "tier", {"free", "premium", "enterprise"}),
        ("Cost by model in the time range", "model", {"other"}),
        ("Top 10 users by cost in the time range", "user", {"alice", "bob", "carol"}),
        ("Tokens by billed kind in the time range", "kind", {"input", "output"}),
        ("Cost in the time range", "", {""}),
    ]
    deadline = time.monotonic() + 30
    missing = expected
    while missing and time.monotonic() < deadline:
        missing = [
            (title, label, want)
            for title, label, want in missing
            if not want <= nonzero(prometheus, panel_expr(title), label)
        ]
        if missing:
            time.sleep(0.5)
    got = {title: nonzero(prometheus, panel_expr(title), label) for title, label, _ in missing}
    assert not missing, f"panels without their series: {missing}, got {got}"
