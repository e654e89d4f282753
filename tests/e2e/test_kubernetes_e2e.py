"""Through a real Envoy: TokenReview identity and ConfigMap tiers served by the Kubernetes emulator."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.stack import LocalStack
from tests.k8s_emulator import KubeEmulator

pytestmark = pytest.mark.e2e

TIERS = """\
- {name: free, level: 0, groups: [tier-free-users, system:authenticated]}
- {name: premium, level: 1, groups: [tier-premium-users, premium-group]}
- {name: enterprise, level: 2, groups: [tier-enterprise-users, enterprise-group, admin-group]}
"""
PATH = "/llm/facebook-opt-125m-simulated/v1/chat/completions"


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[KubeEmulator]:
    with KubeEmulator(tmp_path) as server:
        server.set_config_map("maas-api", "tier-to-group-mapping", {"tiers": TIERS})
        yield server


@pytest.fixture
def stack(emulator: KubeEmulator, tmp_path: Path) -> Iterator[LocalStack]:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "identity": {
                    "source": "kubernetes",
                    "kubeconfig": str(emulator.write_kubeconfig()),
                },
                "tiers": {"source": "configmap"},
            }
        )
    )
    with LocalStack(config_path=config, log_dir=tmp_path) as running:
        yield running


def call(url: str, token: str) -> tuple[int, Message, Any]:
    body = json.dumps(
        {"model": "facebook-opt-125m-simulated", "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.loads(error.read() or b"null")


def sim_records(stack: LocalStack) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{stack.sim_url}/_sim/records", timeout=10) as response:
        records: list[dict[str, Any]] = json.loads(response.read())
    return records


def test_a_service_account_token_gets_its_tier_and_a_bogus_token_gets_401(
    emulator: KubeEmulator, stack: LocalStack
) -> None:
    token = emulator.add_sa_token("maas-default-gateway-tier-premium", "alice-example-com-1a2b3c4d")
    status, _, _ = call(stack.url + PATH, token)
    assert status == 200, stack.log("sidecar")[-2000:]
    records = sim_records(stack)
    assert len(records) == 1
    assert records[0]["headers"]["x-maas-tier"] == "premium"
    assert records[0]["headers"]["x-maas-username"] == "alice-example-com-1a2b3c4d"

    status, headers, body = call(stack.url + PATH, "bogus-token")
    assert status == 401
    assert (headers.get("WWW-Authenticate") or "").lower().startswith("bearer")
    assert body["error"]["code"] == "unauthenticated"
    assert len(sim_records(stack)) == 1  # the refused request never reached the model
    assert emulator.counts["tokenreviews"] == 2
