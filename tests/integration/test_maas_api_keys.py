"""Subscription-era identity: sk-oai-* keys validated by the maas-api stand-in over HTTPS (verified
against its CA), cached by hash with a negative cache and shared first calls; other bearer tokens
reviewed by the Kubernetes emulator with the configured audiences, counted by their username."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from extproc.authz.kubernetes_identity import KubernetesIdentities
from extproc.config import IdentityConfig, SubscriptionsConfig
from extproc.domain import Identity
from extproc.errors import ConfigError, IdentityUnavailable
from extproc.observability.metrics import Metrics
from extproc.sim.maas_api import MaasApiStandIn
from extproc.stack import self_signed_cert
from extproc.subscriptions.identity import MaasApiKeys
from extproc.subscriptions.maas_api import MaasApi
from tests.k8s_emulator import KubeEmulator

ALICE_KEY = "sk-oai-aliceKeyId01_aliceSecret01"
REVOKED_KEY = "sk-oai-oldKeyId01_oldSecret01"
KEYS = [
    {
        "key": ALICE_KEY,
        "id": "3d1b0c8e-6a47-4a4d-9d2c-8f0e1a2b3c4d",
        "name": "alice-laptop",
        "username": "alice@example.com",
        "groups": ["team-a", "system:authenticated"],
        "subscription": "simulator-subscription",
    },
    {
        "key": REVOKED_KEY,
        "id": "3d1b0c8e-6a47-4a4d-9d2c-8f0e1a2b3c4e",
        "username": "alice@example.com",
        "subscription": "simulator-subscription",
        "status": "revoked",
    },
]
CLUSTER_AUDIENCE = "https://kubernetes.default.svc"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[KubeEmulator]:
    with KubeEmulator(tmp_path) as server:
        yield server


@pytest.fixture
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    cert, key = self_signed_cert(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context, cert


@pytest.fixture
async def maas_api(tls: tuple[ssl.SSLContext, Path]) -> AsyncIterator[MaasApiStandIn]:
    stand_in = MaasApiStandIn(keys=KEYS)
    await stand_in.start(tls=tls[0])
    yield stand_in
    await stand_in.stop()


@pytest.fixture
async def identities(
    maas_api: MaasApiStandIn, tls: tuple[ssl.SSLContext, Path], emulator: KubeEmulator
) -> AsyncIterator[tuple[MaasApiKeys, Clock]]:
    from extproc.authz.kube import Kube

    clock = Clock()
    kube = Kube.connect(str(emulator.write_kubeconfig()))
    metrics = Metrics()
    tokens = KubernetesIdentities(
        kube.retain(), IdentityConfig(audiences=(CLUSTER_AUDIENCE,)), metrics, full_username=True
    )
    api = MaasApi(maas_api.url, ca_file=tls[1])
    keys = MaasApiKeys(api, tokens, SubscriptionsConfig(), metrics, clock=clock)
    yield keys, clock
    await keys.close()
    await kube.close()


async def test_a_key_is_its_owner_with_the_groups_and_subscription_it_was_minted_with(
    identities: tuple[MaasApiKeys, Clock],
) -> None:
    keys, _ = identities
    assert await keys.authenticate(ALICE_KEY) == Identity(
        userid="alice@example.com",  # auth.identity.userid is the key's username
        username="alice@example.com",
        groups=("team-a", "system:authenticated"),
        key_id="3d1b0c8e-6a47-4a4d-9d2c-8f0e1a2b3c4d",
        key_name="alice-laptop",
        subscription="simulator-subscription",
    )
    assert await keys.authenticate(REVOKED_KEY) is None
    assert await keys.authenticate("sk-oai-unknown01_secret01") is None
    assert await keys.authenticate("sk-oai-not_base62!") is None


async def test_answers_are_kept_by_hash_for_their_ttl_and_first_calls_are_shared(
    identities: tuple[MaasApiKeys, Clock], maas_api: MaasApiStandIn
) -> None:
    keys, clock = identities
    found = await asyncio.gather(*(keys.authenticate(ALICE_KEY) for _ in range(20)))
    assert {i.userid if i else None for i in found} == {"alice@example.com"}
    assert maas_api.calls["validate"] == 1  # twenty concurrent first requests, one call
    clock.now += 59
    await keys.authenticate(ALICE_KEY)
    assert maas_api.calls["validate"] == 1
    clock.now += 2  # past the 60 s default: asked again (a revoked key stops working)
    maas_api.set_keys([])
    assert await keys.authenticate(ALICE_KEY) is None
    assert maas_api.calls["validate"] == 2
    assert await keys.authenticate(ALICE_KEY) is None  # the refusal is kept too
    assert maas_api.calls["validate"] == 2


async def test_maas_api_down_keeps_cached_keys_and_fails_closed_for_new_ones(
    identities: tuple[MaasApiKeys, Clock], maas_api: MaasApiStandIn
) -> None:
    keys, _ = identities
    assert await keys.authenticate(ALICE_KEY) is not None
    maas_api.fail_status = 500
    assert await keys.authenticate(ALICE_KEY) is not None
    with pytest.raises(IdentityUnavailable):
        await keys.authenticate(REVOKED_KEY)


async def test_a_certificate_the_ca_did_not_sign_is_refused(
    maas_api: MaasApiStandIn, tmp_path: Path
) -> None:
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other_ca, _ = self_signed_cert(other_dir)
    api = MaasApi(maas_api.url, ca_file=other_ca)
    try:
        with pytest.raises(IdentityUnavailable):
            await api.validate(ALICE_KEY, IdentityUnavailable)
        assert maas_api.calls["validate"] == 0  # the handshake failed: nothing was sent
    finally:
        await api.close()
    with pytest.raises(ConfigError, match=r"subscriptions\.maas_api_ca_file"):
        MaasApi(maas_api.url, ca_file=tmp_path / "missing.pem")


async def test_other_bearers_go_through_tokenreview_with_the_configured_audience(
    identities: tuple[MaasApiKeys, Clock], emulator: KubeEmulator, maas_api: MaasApiStandIn
) -> None:
    keys, _ = identities
    user = emulator.add_token("bob", ["team-b"], audiences=(CLUSTER_AUDIENCE,))
    sa = emulator.add_sa_token("ci", "runner", audiences=(CLUSTER_AUDIENCE,))
    wrong_audience = emulator.add_token("carol", ["team-c"])
    found = await keys.authenticate(user)
    assert found is not None
    assert (found.userid, found.groups, found.key_name) == ("bob", ("team-b",), "")
    found_sa = await keys.authenticate(sa)
    assert found_sa is not None
    assert found_sa.userid == "system:serviceaccount:ci:runner"  # the whole username
    assert await keys.authenticate(wrong_audience) is None
    assert maas_api.calls["validate"] == 0
    reviews = emulator.counts["tokenreviews"]
    assert reviews == 3
