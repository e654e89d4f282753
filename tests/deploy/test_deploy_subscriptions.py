"""deploy/overlays/maas-subscriptions: builds, validates, runs the subscription era as deployed,
trusts maas-api's service CA, may reach maas-api, reads the three MaaS kinds read-only."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from extproc import config as config_mod
from extproc.admission import AdmissionRequest
from extproc.app import Sidecar
from extproc.domain import Outcome
from extproc.sim.maas_api import MaasApiStandIn
from tests.deploy.test_deploy import (
    CUSTOM_KINDS,
    DEPLOY,
    GATEWAY_NS,
    KUBERNETES_VERSION,
    LEAN_ORDER,
    REPO,
    SIDECAR_NS,
    STORE_URL,
    SUBJECT,
    Doc,
    assert_filters_equal_local_ones,
    assert_patch_order,
    check_config,
    gateway_ports,
    kustomize,
    literal_env,
    only,
    patches,
    sidecar_config_text,
    sidecar_container,
    walk,
)
from tests.deploy.test_rbac_use import PATH, assert_rules_fit, watching
from tests.k8s_emulator import KubeEmulator
from tests.tls_fixtures import Pki

OVERLAY = DEPLOY / "overlays" / "maas-subscriptions"
MAAS_NS = "models-as-a-service"


@pytest.fixture(scope="module")
def docs() -> list[Doc]:
    return kustomize(OVERLAY)


def deployed_config(docs: list[Doc], tmp_path: Path) -> config_mod.Config:
    path = tmp_path / "config.yaml"
    path.write_text(sidecar_config_text(docs))
    return config_mod.load(
        path, {**literal_env(sidecar_container(docs)), "MAAS_EXTPROC_STORE_URL": STORE_URL}
    )


def test_it_builds_and_validates(docs: list[Doc]) -> None:
    keys = [(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), "duplicate resources"
    namespaces = {d["metadata"].get("namespace") for d in docs}
    assert namespaces == {None, SIDECAR_NS, GATEWAY_NS, MAAS_NS, "opendatahub"}
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert doc["kind"] in CUSTOM_KINDS
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")


def test_the_deployed_config_is_the_subscription_era(
    docs: list[Doc], tmp_path: Path, pki: Pki
) -> None:
    config = deployed_config(docs, tmp_path)
    assert config.maas.era == "subscriptions"
    assert (config.identity.source, config.identity.tokens) == ("maas_api_keys", "kubernetes")
    assert config.identity.audiences == ("https://kubernetes.default.svc",)  # MaaS's default
    assert config.access.check == "none"  # MaaSAuthPolicy decides, through the selection
    assert (config.subscriptions.selection, config.subscriptions.namespace) == ("watch", MAAS_NS)
    assert config.subscriptions.maas_api_url.startswith("https://maas-api.opendatahub.svc")
    # Behind MaaS's gateway AuthPolicy, which refuses requests carrying them: left to it.
    assert config.subscriptions.identity_headers is False
    # MaaS's payload-processing (stream-usage-enforcer) asks streams for usage: not twice.
    assert config.accounting.inject_include_usage is False
    assert (config.kuadrant.mode, config.kuadrant.policies) == ("gaps", "watch")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_EXTPROC_")}
    env.update(literal_env(sidecar_container(docs)), MAAS_EXTPROC_STORE_URL=STORE_URL)
    env["MAAS_EXTPROC_SUBSCRIPTIONS_MAAS_API_CA_FILE"] = str(pki.ca("maas-api-ca").cert)
    result = check_config(tmp_path / "config.yaml", env)
    assert result.returncode == 0, result.stderr
    assert "era=subscriptions, selection=watch" in result.stdout


def test_maas_apis_service_ca_is_trusted_and_maas_api_reachable(
    docs: list[Doc], tmp_path: Path
) -> None:
    bundle = only(docs, "ConfigMap", "maas-extproc-service-ca")
    assert bundle["metadata"]["annotations"] == {
        "service.beta.openshift.io/inject-cabundle": "true"
    }
    container = sidecar_container(docs)
    pod = only(docs, "Deployment", "maas-extproc")["spec"]["template"]["spec"]
    volume = next(
        v for v in pod["volumes"] if v.get("configMap", {}).get("name") == "maas-extproc-service-ca"
    )
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    ca_file = deployed_config(docs, tmp_path).subscriptions.maas_api_ca_file
    assert ca_file == f"{mount['mountPath']}/{volume['configMap']['items'][0]['path']}"
    policy = only(docs, "NetworkPolicy", "maas-extproc-to-maas-api")
    assert policy["metadata"]["namespace"] == "opendatahub"
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": 8443, "protocol": "TCP"}]
    (peer,) = rule["from"]
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": SIDECAR_NS}}
    template = only(docs, "Deployment", "maas-extproc")["spec"]["template"]["metadata"]["labels"]
    assert peer["podSelector"]["matchLabels"].items() <= template.items()


def test_rbac_reads_the_three_kinds_and_nothing_it_does_not_use(docs: list[Doc]) -> None:
    for value in walk([d for d in docs if d["kind"] in ("ClusterRole", "Role")]):
        assert value != "*", "wildcards in RBAC"
    verbs = {
        (d["kind"], d["metadata"].get("namespace"), g, res): tuple(r["verbs"])
        for d in docs
        if d["kind"] in ("ClusterRole", "Role")
        for r in d["rules"]
        for g in r["apiGroups"]
        for res in r["resources"]
    }
    assert verbs == {
        ("ClusterRole", None, "authentication.k8s.io", "tokenreviews"): ("create",),
        ("Role", MAAS_NS, "maas.opendatahub.io", "maassubscriptions"): ("list", "watch"),
        ("Role", MAAS_NS, "maas.opendatahub.io", "maasauthpolicies"): ("list", "watch"),
        ("ClusterRole", None, "maas.opendatahub.io", "maasmodelrefs"): ("list", "watch"),
        ("ClusterRole", None, "kuadrant.io", "tokenratelimitpolicies"): ("list", "watch"),
    }
    for binding in [d for d in docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")]:
        assert binding["subjects"] == [SUBJECT]


def test_it_attaches_the_lean_layout(docs: list[Doc], tmp_path: Path) -> None:
    """As every overlay on production: the route exemptions it appends come after the indexed
    patches, and the sidecar listens for ext_authz's HTTP checks on the port opened to the gateway."""
    assert_patch_order(docs, LEAN_ORDER)
    assert_filters_equal_local_ones(docs, streamed=False)
    assert deployed_config(docs, tmp_path).server.authz_http_port == 9002
    assert gateway_ports(docs) == {9000, 9002}


def test_every_maas_api_route_skips_our_filters(docs: list[Doc]) -> None:
    names = [
        p["match"]["routeConfiguration"]["vhost"]["route"]["name"]
        for p in patches(docs, "HTTP_ROUTE")
    ]
    assert names == [f"opendatahub.maas-api-route.{n}" for n in range(4)]


UPSTREAM = REPO / "tests" / "fixtures" / "upstream"
CLUSTER_AUDIENCE = "https://kubernetes.default.svc"


async def test_every_rbac_rule_is_needed_and_enough(docs: list[Doc], tmp_path: Path) -> None:
    """As tests/deploy/test_rbac_use.py does for the tier-era overlays: the overlay's sidecar,
    from its own config, against the emulator serving the upstream MaaS objects and policies."""
    objects = [
        d
        for name in (
            "maas-c0639b1b-subscriptions.yaml",
            "maas-c0639b1b-token-rate-limit-policies.yaml",
        )
        for d in yaml.safe_load_all((UPSTREAM / name).read_text())
        if d
    ]
    stand_in = MaasApiStandIn(objects)
    await stand_in.start()
    with KubeEmulator(tmp_path) as emulator:
        emulator.put_objects(objects)
        path = tmp_path / "config.yaml"
        path.write_text(sidecar_config_text(docs))
        overrides = {
            "MAAS_EXTPROC_IDENTITY_KUBECONFIG": str(emulator.write_kubeconfig()),
            "MAAS_EXTPROC_STORE_URL": "memory://",
            "MAAS_EXTPROC_SUBSCRIPTIONS_MAAS_API_URL": stand_in.url,
            "MAAS_EXTPROC_SUBSCRIPTIONS_MAAS_API_CA_FILE": "",
        }
        config = config_mod.load(path, {**literal_env(sidecar_container(docs)), **overrides})
        sidecar = Sidecar.build(config)
        try:
            await sidecar.start()
            token = emulator.add_token(
                "alice", ["system:authenticated"], audiences=(CLUSTER_AUDIENCE,)
            )
            body = json.dumps({"model": "m", "max_tokens": 4}).encode()
            request = AdmissionRequest("POST", PATH, {"authorization": f"Bearer {token}"}, body)
            for _ in range(200):  # until the watches have listed the objects
                decision = await sidecar.admission.decide(request)
                if decision.outcome is not Outcome.UNAVAILABLE:
                    break
                await asyncio.sleep(0.02)
            assert decision.outcome is Outcome.ALLOW, decision.reason
            await watching(
                emulator,
                [
                    "maassubscriptions",
                    "maasauthpolicies",
                    "maasmodelrefs",
                    "tokenratelimitpolicies",
                ],
            )
        finally:
            await sidecar.close()
            await stand_in.stop()
        assert_rules_fit(docs, emulator.audit, "maas-subscriptions")
