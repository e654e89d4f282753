"""Every RBAC rule in deploy/ is needed, and enough: each overlay's sidecar, built from that
overlay's own config, runs against the Kubernetes emulator, which records every request as the
API server's authorizer sees it (verb, group, resource, namespace, name)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml
from aiohttp import web

from extproc import config as config_mod
from extproc.admission import AdmissionRequest
from extproc.app import Sidecar
from extproc.domain import Outcome
from tests.deploy.test_deploy import (
    SIDECAR_NS,
    TARGETS,
    Doc,
    kustomize,
    literal_env,
    sidecar_config_text,
    sidecar_container,
)
from tests.helpers import eventually
from tests.k8s_emulator import ApiRequest, KubeEmulator

UPSTREAM = Path(__file__).resolve().parents[1] / "fixtures" / "upstream"
PATH = "/llm/facebook-opt-125m-simulated/v1/chat/completions"
CUSTOM = (
    ("kuadrant.io", "v1alpha1", "tokenratelimitpolicies", "TokenRateLimitPolicy"),
    ("kuadrant.io", "v1", "ratelimitpolicies", "RateLimitPolicy"),
    ("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute"),
)


class Grant(NamedTuple):
    """One verb on one resource that a bound rule gives our service account."""

    namespace: str | None  # None: every namespace (a ClusterRoleBinding)
    group: str
    resource: str
    verb: str
    name: str | None  # None: any name (no resourceNames)

    def allows(self, request: ApiRequest) -> bool:
        return (
            (self.group, self.resource, self.verb)
            == (request.group, request.resource, request.verb)
            and self.namespace in (None, request.namespace)
            and self.name in (None, request.name)
        )


def grants(docs: list[Doc]) -> set[Grant]:
    """What the bindings to the sidecar's service account grant."""
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d for d in docs}
    subject = {"kind": "ServiceAccount", "name": "maas-extproc", "namespace": SIDECAR_NS}
    out: set[Grant] = set()
    for binding in docs:
        if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        assert binding["subjects"] == [subject]
        namespace = binding["metadata"].get("namespace")  # None for a ClusterRoleBinding
        ref = binding["roleRef"]
        role = roles[(ref["kind"], namespace if ref["kind"] == "Role" else None, ref["name"])]
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        for name in rule.get("resourceNames") or [None]:
                            out.add(Grant(namespace, group, resource, verb, name))
    return out


@pytest.fixture(scope="module")
def built() -> dict[str, list[Doc]]:
    return {name: kustomize(path) for name, path in TARGETS.items()}


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[KubeEmulator]:
    with KubeEmulator(tmp_path) as server:
        for group, version, plural, kind in CUSTOM:
            server.define_custom(group, version, plural, kind)
        mapping = yaml.safe_load(
            (UPSTREAM / "maas-ae050cb6-tier-to-group-mapping.yaml").read_text()
        )
        server.set_config_map("maas-api", "tier-to-group-mapping", mapping["data"])
        server.allow("group:system:authenticated", "llm")
        yield server


@pytest.fixture
async def maas_api() -> AsyncIterator[str]:
    """maas-api's tier lookup, answering every caller "free"."""

    async def lookup(_request: web.Request) -> web.Response:
        return web.json_response({"tier": "free", "displayName": "Free Tier"})

    app = web.Application()
    app.router.add_post("/v1/tiers/lookup", lookup)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


def overlay_config(docs: list[Doc], tmp_path: Path, overrides: dict[str, str]) -> config_mod.Config:
    """The overlay's own config and env, reaching local stand-ins instead of the cluster's."""
    path = tmp_path / "config.yaml"
    path.write_text(sidecar_config_text(docs))
    return config_mod.load(path, {**literal_env(sidecar_container(docs)), **overrides})


@pytest.mark.parametrize("target", TARGETS)
async def test_every_rbac_rule_is_needed_and_enough(
    built: dict[str, list[Doc]],
    target: str,
    emulator: KubeEmulator,
    maas_api: str,
    tmp_path: Path,
) -> None:
    docs = built[target]
    config = overlay_config(
        docs,
        tmp_path,
        {
            "MAAS_EXTPROC_IDENTITY_KUBECONFIG": str(emulator.write_kubeconfig()),
            "MAAS_EXTPROC_STORE_URL": "memory://",
            "MAAS_EXTPROC_TIERS_MAAS_API_URL": maas_api,
            "MAAS_EXTPROC_TIERS_MAAS_API_CA_FILE": "",
        },
    )
    sidecar = Sidecar.build(config)
    try:
        await sidecar.start()
        token = emulator.add_sa_token("maas-default-gateway-tier-free", "alice")
        body = json.dumps({"model": "m", "max_tokens": 4}).encode()
        request = AdmissionRequest("POST", PATH, {"authorization": f"Bearer {token}"}, body)
        decision = await sidecar.admission.decide(request)
        assert decision.outcome is Outcome.ALLOW, decision.reason
        watches = {
            "configmaps": config.tiers.source == "configmap",
            "tokenratelimitpolicies": config.kuadrant.policies == "watch",
            "ratelimitpolicies": config.kuadrant.policies == "watch",
            "httproutes": config.kuadrant.httproutes == "watch",
        }
        await watching(emulator, [r for r, on in watches.items() if on])
    finally:
        await sidecar.close()

    assert_rules_fit(docs, emulator.audit, target)


async def watching(emulator: KubeEmulator, resources: list[str]) -> None:
    """Wait until the sidecar watches each resource (its watch threads start on their own)."""
    for resource in resources:
        await eventually(
            lambda r=resource: any(  # type: ignore[misc]
                a.verb == "watch" and a.resource == r for a in emulator.audit
            ),
            f"a watch of {resource}",
        )


def assert_rules_fit(docs: list[Doc], audit: list[ApiRequest], target: str) -> None:
    """Every request the sidecar made is allowed, and every granted rule was used."""
    used = set(audit)
    granted = grants(docs)
    refused = {request for request in used if not any(g.allows(request) for g in granted)}
    assert refused == set(), f"{target}: requests no rule allows"
    unused = {grant for grant in granted if not any(grant.allows(r) for r in used)}
    assert unused == set(), f"{target}: rules no request needs"
