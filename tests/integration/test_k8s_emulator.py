"""The Kubernetes emulator refuses what the API server refuses, with the API server's Status."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from extproc.authz.kube import Kube
from tests.k8s_emulator import CLIENT_TOKEN, ApiRequest, KubeEmulator

Json = dict[str, Any]


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[KubeEmulator]:
    with KubeEmulator(tmp_path) as server:
        server.define_custom("kuadrant.io", "v1alpha1", "tokenratelimitpolicies", "TRLP")
        yield server


def refusal(call: Any) -> tuple[int, Json]:
    with pytest.raises(ApiException) as raised:
        call()
    body: Json = json.loads(raised.value.body)
    return int(raised.value.status), body


def post_raw(emulator: KubeEmulator, path: str, body: bytes) -> tuple[int, Json]:
    context = ssl.create_default_context(cadata=emulator.ca_pem.decode())
    request = urllib.request.Request(
        emulator.url + path,
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {CLIENT_TOKEN}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, context=context, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def test_a_token_review_without_a_token_is_a_bad_request(
    emulator: KubeEmulator, kube: Kube
) -> None:
    review = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=""))
    status, body = refusal(lambda: kube.authentication.create_token_review(review))
    # kubernetes pkg/registry/authentication/tokenreview/storage.go: NewBadRequest.
    assert status == 400
    assert body == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "token is required for TokenReview in authentication",
        "reason": "BadRequest",
        "code": 400,
    }


async def test_an_invalid_access_review_is_unprocessable_with_every_cause(
    emulator: KubeEmulator, kube: Kube
) -> None:
    review = client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec())
    status, body = refusal(lambda: kube.authorization.create_subject_access_review(review))
    # pkg/apis/authorization/validation/validation.go, reported by NewInvalid as a 422.
    assert status == 422
    assert (body["kind"], body["reason"], body["code"]) == ("Status", "Invalid", 422)
    assert body["details"]["kind"] == "SubjectAccessReview"
    assert [c["field"] for c in body["details"]["causes"]] == [
        "spec.resourceAttributes",
        "spec.user",
    ]
    assert body["message"].startswith('SubjectAccessReview.authorization.k8s.io "" is invalid: [')

    both = client.V1SubjectAccessReviewSpec(
        user="u",
        resource_attributes=client.V1ResourceAttributes(verb="post"),
        non_resource_attributes=client.V1NonResourceAttributes(path="/x", verb="get"),
    )
    status, body = refusal(
        lambda: kube.authorization.create_subject_access_review(
            client.V1SubjectAccessReview(spec=both)
        )
    )
    assert status == 422
    assert [c["field"] for c in body["details"]["causes"]] == ["spec.nonResourceAttributes"]
    assert emulator.access_reviews == []  # never evaluated


def test_a_body_that_is_not_the_kind_is_a_bad_request(emulator: KubeEmulator) -> None:
    path = "/apis/authentication.k8s.io/v1/tokenreviews"
    status, body = post_raw(emulator, path, b"{not json")
    assert (status, body["reason"]) == (400, "BadRequest")
    wrong = {"apiVersion": "v1", "kind": "ConfigMap", "spec": {"token": "t"}}
    status, body = post_raw(emulator, path, json.dumps(wrong).encode())
    assert (status, body["reason"]) == (400, "BadRequest")
    assert emulator.counts["tokenreviews"] == 2


async def test_lists_refuse_selectors_the_api_server_refuses(
    emulator: KubeEmulator, kube: Kube
) -> None:
    custom = client.CustomObjectsApi(kube.api_client)

    def listing(**selectors: str) -> Any:
        return custom.list_namespaced_custom_object(
            "kuadrant.io", "v1alpha1", "openshift-ingress", "tokenratelimitpolicies", **selectors
        )

    status, body = refusal(lambda: listing(field_selector="spec.limits=x"))
    assert (status, body["message"]) == (400, "field label not supported: spec.limits")
    status, body = refusal(lambda: listing(label_selector="a in (b"))
    assert (status, body["reason"]) == (400, "BadRequest")
    status, body = refusal(lambda: listing(label_selector="-bad-key-=x"))
    assert status == 400

    emulator.put_custom(
        "kuadrant.io",
        "v1alpha1",
        "openshift-ingress",
        "tokenratelimitpolicies",
        {"metadata": {"name": "p", "labels": {"tier": "free", "team": "a"}}},
    )
    assert [i["metadata"]["name"] for i in listing(label_selector="tier=free")["items"]] == ["p"]
    assert listing(label_selector="tier in (gold, premium)")["items"] == []
    assert len(listing(label_selector="team,!missing,tier!=gold")["items"]) == 1
    assert len(listing(field_selector="metadata.name=p")["items"]) == 1
    assert listing(field_selector="metadata.name!=p")["items"] == []


async def test_every_request_is_recorded_as_rbac_authorizes_it(
    emulator: KubeEmulator, kube: Kube
) -> None:
    custom = client.CustomObjectsApi(kube.api_client)
    custom.list_cluster_custom_object(
        "kuadrant.io", "v1alpha1", "tokenratelimitpolicies", label_selector="x=y"
    )
    kube.core.list_namespaced_config_map("maas-api", field_selector="metadata.name=tiers")
    kube.authentication.create_token_review(
        client.V1TokenReview(spec=client.V1TokenReviewSpec(token="t"))
    )
    assert emulator.audit == [
        ApiRequest("list", "kuadrant.io", "tokenratelimitpolicies", ""),
        ApiRequest("list", "", "configmaps", "maas-api", "tiers"),
        ApiRequest("create", "authentication.k8s.io", "tokenreviews", ""),
    ]
