"""A real Envoy talking mTLS to the sidecar: its requests are admitted and charged; a stranger's are not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from extproc.stack import LocalStack, SidecarTls
from tests.e2e.support import sim_records
from tests.helpers import CHAT, KEYS
from tests.tls_fixtures import Pki

pytestmark = pytest.mark.e2e

ENVOY_ID = "spiffe://cluster.local/ns/openshift-ingress/sa/maas-default-gateway-openshift-default"


def sidecar_tls(pki: Pki, envoy_ca_name: str) -> SidecarTls:
    """The sidecar's certificate from one CA (a service CA), Envoy's from another (a mesh CA)."""
    service_ca = pki.ca("service-ca")
    server = pki.issue(service_ca, "sidecar", ["DNS:localhost"], "serverAuth")
    mesh_ca = pki.ca("mesh-ca")
    envoy_ca = mesh_ca if envoy_ca_name == "mesh-ca" else pki.ca(envoy_ca_name)
    envoy = pki.issue(envoy_ca, f"envoy-{envoy_ca_name}", [f"URI:{ENVOY_ID}"], "clientAuth")
    return SidecarTls(
        server_cert=server.cert,
        server_key=server.key,
        server_ca=service_ca.cert,
        client_cert=envoy.cert,
        client_key=envoy.key,
        client_ca=mesh_ca.cert,
    )


def start(tls: SidecarTls, log_dir: Path) -> LocalStack:
    env = {"MAAS_EXTPROC_SERVER_TLS_CLIENT_NAMES": ENVOY_ID}
    return LocalStack(sidecar_tls=tls, env=env, log_dir=log_dir).start()


@pytest.fixture
def stack(pki: Pki, tmp_path: Path) -> Iterator[LocalStack]:
    running = start(sidecar_tls(pki, "mesh-ca"), tmp_path)
    yield running
    running.stop()


def chat(stack: LocalStack) -> httpx.Response:
    body = {"model": "tls-m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {KEYS['premium']}"}
    return httpx.post(stack.url + CHAT, json=body, headers=headers, timeout=10)


def charged_tokens(stack: LocalStack) -> int:
    response = httpx.get(
        f"http://127.0.0.1:{stack.usage_port}/v1/usage",
        headers={"Authorization": f"Bearer {KEYS['premium']}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    total: int = response.json()["totals"]["total_tokens"]
    return total


def test_envoy_over_mtls_gets_requests_admitted_and_charged(stack: LocalStack) -> None:
    response = chat(stack)
    assert response.status_code == 200, response.text
    assert response.headers["x-ratelimit-limit"]  # ext_authz answered over mTLS
    assert charged_tokens(stack) == response.json()["usage"]["total_tokens"] > 0
    assert "Traceback" not in stack.log("sidecar")


def test_envoy_with_a_certificate_from_another_ca_gets_nothing_through(
    pki: Pki, tmp_path: Path
) -> None:
    stranger = start(sidecar_tls(pki, "other-ca"), tmp_path)
    try:
        response = chat(stranger)
        # The handshake fails and the filters fail closed: ext_authz answers 503, which becomes
        # 500 where ext_proc also fails closed and cannot reach the sidecar for that reply either.
        assert response.status_code in (500, 503), response.text
        assert sim_records(stranger) == []  # nothing reached the model
        assert charged_tokens(stranger) == 0
        assert "Traceback" not in stranger.log("sidecar")
    finally:
        stranger.stop()
