"""The subscription era through a real Envoy: the local stack with the maas-api stand-in over HTTPS
(deploy/local/subscriptions: its objects and keys), the sidecar and the simulator.

API keys run under the subscription they are bound to, up to its per-model limit; token callers
pick one with X-MaaS-Subscription or get 403 multiple_subscriptions; a client X-MaaS-Username is
refused; the ledger books usage to the subscription and the key; Limitador (the emulator) gets
Reports in the subscription's limit of the model's policy, in the model route's domain."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from extproc.stack import LocalStack
from tests.e2e.support import sample, sim_records
from tests.k8s_emulator import KubeEmulator
from tests.limitador_emulator import LimitadorEmulator

pytestmark = pytest.mark.e2e

CHAT = "/llm/facebook-opt-125m-simulated/v1/chat/completions"
BODY_ROUTED = "/v1/chat/completions"
ALICE_KEY = "sk-oai-demoAlice01_aliceSecretForTheLocalDemo"  # simulator-subscription: 100/min
BOB_KEY = "sk-oai-demoBob01_bobSecretForTheLocalDemo"  # premium-subscription: 5000/min, 100000/day
NS = "models-as-a-service"
PREMIUM = f"{NS}/premium-subscription"
FREE = f"{NS}/simulator-subscription"
DOMAIN = "llm/facebook-opt-125m-simulated-kserve-route"
PREMIUM_LIMIT = "models-as-a-service-premium-subscription-facebook-opt-125m-simulated-tokens"
MESSAGES = [{"role": "user", "content": "how many tokens does this take"}]


def ask(
    stack: LocalStack, token: str, path: str = CHAT, max_tokens: int = 9, **headers: str
) -> httpx.Response:
    body = {"model": "facebook/opt-125m", "messages": MESSAGES, "max_tokens": max_tokens}
    sent = {"Authorization": f"Bearer {token}", **headers}
    return httpx.post(stack.url + path, json=body, headers=sent, timeout=20)


def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(200):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


@pytest.fixture(scope="module")
def limitador() -> Iterator[LimitadorEmulator]:
    # The limit Kuadrant makes of maas-trlp-<model>'s limit for premium-subscription, in the
    # route's namespace; its key written out from the documented rule (CONTRACTS §9).
    hashed = f"llm/maas-trlp-facebook-opt-125m-simulated/{PREMIUM_LIMIT}".encode()
    flag = f"tokenlimit.{PREMIUM_LIMIT.replace('-', '_')}__{hashlib.sha256(hashed).hexdigest()[:8]}"
    with LimitadorEmulator() as emulator:
        emulator.set_limits(
            [
                {
                    "namespace": DOMAIN,
                    "max_value": 5000,
                    "seconds": 60,
                    "name": PREMIUM_LIMIT,
                    "conditions": [f'descriptors[0]["{flag}"] == "1"'],
                    "variables": ['descriptors[0]["auth.identity.userid"]'],
                }
            ]
        )
        yield emulator


@pytest.fixture(scope="module")
def stack(limitador: LimitadorEmulator) -> Iterator[LocalStack]:
    env = {
        "MAAS_EXTPROC_KUADRANT_MODE": "all",
        "MAAS_EXTPROC_KUADRANT_LIMITADOR_GRPC": limitador.grpc_target,
        "MAAS_EXTPROC_KUADRANT_LIMITADOR_HTTP": limitador.http_url,
        "MAAS_EXTPROC_KUADRANT_BATCH_INTERVAL_S": "0.05",
    }
    with LocalStack(era="subscriptions", env=env) as running:
        assert running.maas_api_url.startswith("https://")  # CA-verified, as on a cluster
        yield running


def test_an_api_key_runs_under_its_subscription_up_to_the_models_limit(stack: LocalStack) -> None:
    first = ask(stack, ALICE_KEY, max_tokens=30)
    assert first.status_code == 200, first.text
    assert first.headers["x-ratelimit-limit"] == "100"  # simulator-subscription, 100 a minute
    refused = None
    for _ in range(10):
        reply = ask(stack, ALICE_KEY, max_tokens=30)
        if reply.status_code == 429:
            refused = reply
            break
        assert reply.status_code == 200, reply.text
    assert refused is not None, "the 100-token limit never refused"
    assert int(refused.headers["retry-after"]) >= 1
    error = refused.json()["error"]
    assert (error["code"], error["limit"]) == ("token_limited", "tokens")
    assert "subscription models-as-a-service/simulator-subscription" in error["message"]
    # Another user's key, another subscription: not limited by alice's budget.
    assert ask(stack, BOB_KEY).status_code == 200


def test_a_token_caller_chooses_with_x_maas_subscription(stack: LocalStack) -> None:
    # bob's demo token owns both subscriptions of the model.
    refused = ask(stack, "demo-premium-key")
    assert refused.status_code == 403
    assert refused.headers["x-ext-auth-reason"] == "multiple_subscriptions"
    assert "X-MaaS-Subscription" in refused.json()["error"]["message"]
    chosen = ask(stack, "demo-premium-key", **{"X-MaaS-Subscription": "premium-subscription"})
    assert chosen.status_code == 200, chosen.text
    assert chosen.headers["x-ratelimit-limit"] == "5000"  # the tighter of 5000/min, 100000/day
    other = ask(stack, "demo-premium-key", **{"X-MaaS-Subscription": FREE})
    assert other.status_code == 200
    assert other.headers["x-ratelimit-limit"] == "100"
    nope = ask(stack, "demo-premium-key", **{"X-MaaS-Subscription": "nope"})
    assert (nope.status_code, nope.headers["x-ext-auth-reason"]) == (403, "not_found")
    # A caller who owns one subscription for the model needs no header.
    assert ask(stack, "demo-enterprise-key").status_code == 200
    nobody = ask(stack, "demo-notier-key")  # mallory's groups own no subscription
    assert (nobody.status_code, nobody.headers["x-ext-auth-reason"]) == (403, "not_found")
    # The upstream was told who called and under which subscription.
    seen = [r["headers"] for r in sim_records(stack) if r["status"] == 200]
    assert {h["x-maas-subscription"] for h in seen} >= {PREMIUM, FREE}
    premium = [h for h in seen if h["x-maas-subscription"] == PREMIUM][-1]  # the token's
    assert premium["x-maas-username"] == "bob"
    assert (
        premium["x-maas-group"] == '["system:authenticated","premium-group","system:authenticated"]'
    )


def test_a_body_routed_request_resolves_its_model(stack: LocalStack) -> None:
    reply = ask(stack, BOB_KEY, path=BODY_ROUTED)
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-ratelimit-limit"] == "5000"


@pytest.mark.parametrize("header", ["X-MaaS-Username", "X-MaaS-Group"])
def test_a_client_identity_header_gets_403(stack: LocalStack, header: str) -> None:
    before = len(sim_records(stack))
    reply = ask(stack, BOB_KEY, **{header: "root"})
    assert reply.status_code == 403
    assert reply.headers["x-ext-auth-reason"] == "unauthorized"
    assert len(sim_records(stack)) == before  # never reached the model


def test_ledger_rows_carry_the_subscription_and_the_key(stack: LocalStack) -> None:
    assert ask(stack, BOB_KEY).status_code == 200
    usage = f"http://127.0.0.1:{stack.usage_port}/v1/usage"
    auth = {"Authorization": f"Bearer {BOB_KEY}"}

    def rows(group_by: str) -> list[dict[str, object]]:
        reply = httpx.get(usage, params={"group_by": group_by}, headers=auth, timeout=5)
        assert reply.status_code == 200, reply.text
        found: list[dict[str, object]] = reply.json()["rows"]
        return found

    until(lambda: any(r["subscription"] == PREMIUM for r in rows("subscription")), "the ledger")
    by_sub = {r["subscription"]: r for r in rows("subscription")}
    premium = by_sub[PREMIUM]
    assert (premium["organization_id"], premium["cost_center"]) == ("org-demo", "cc-4242")
    assert int(str(premium["total_tokens"])) > 0
    keys = {(r["key"], r["subscription"]) for r in rows("key")}
    assert ("bob-ci", PREMIUM) in keys
    # premium-subscription's billingRate.perToken "0.000002" (deploy/local/subscriptions): two
    # micro-units a token, for every kind, and every request of it priced (issue #16).
    assert premium["cost_micros"] == 2 * int(str(premium["total_tokens"]))
    assert premium["priced_requests"] == premium["requests"]
    assert by_sub.get(FREE, {}).get("cost_micros") is None  # no billingRate, no pricing: null
    assert sample(stack, "maas_tokens_total", subscription=PREMIUM, kind="total") > 0


def test_kuadrant_reports_carry_the_limit_name_and_the_routes_domain(
    stack: LocalStack, limitador: LimitadorEmulator
) -> None:
    before = limitador.counter(DOMAIN, PREMIUM_LIMIT, "bob")
    reply = ask(stack, BOB_KEY)
    assert reply.status_code == 200
    used = int(reply.json()["usage"]["total_tokens"])
    until(
        lambda: limitador.counter(DOMAIN, PREMIUM_LIMIT, "bob") - before >= used,
        "the report in premium-subscription's limit",
    )
    assert limitador.counter(DOMAIN, PREMIUM_LIMIT, "bob") - before == used
    labelled = [dict(r.labels) for r in limitador.reports if r.domain == DOMAIN and r.labels]
    assert {
        "user": "bob",
        "model": "llm/facebook-opt-125m-simulated",
        "subscription": "premium-subscription",
        "organization_id": "org-demo",
        "cost_center": "cc-4242",
    } in labelled


def test_selection_over_watched_objects(tmp_path: Path) -> None:
    """selection: watch, the Kubernetes emulator serving the same objects as the stand-in."""
    import yaml

    from extproc.stack import SUBSCRIPTIONS_DIR

    objects = [
        d for d in yaml.safe_load_all((SUBSCRIPTIONS_DIR / "maas-objects.yaml").read_text()) if d
    ]
    with KubeEmulator(tmp_path) as emulator:
        emulator.put_objects(objects)
        env = {
            "MAAS_EXTPROC_SUBSCRIPTIONS_SELECTION": "watch",
            "MAAS_EXTPROC_IDENTITY_KUBECONFIG": str(emulator.write_kubeconfig()),
        }
        with LocalStack(era="subscriptions", env=env) as stack:
            until(lambda: ask(stack, "demo-free-key").status_code != 503, "the first list")
            assert ask(stack, "demo-free-key").status_code == 200
            refused = ask(stack, "demo-premium-key")
            assert refused.headers.get("x-ext-auth-reason") == "multiple_subscriptions"
            chosen = ask(stack, BOB_KEY)
            assert chosen.status_code == 200
            assert chosen.headers["x-ratelimit-limit"] == "5000"
        watched = {a.resource for a in emulator.audit if a.verb == "watch"}
        assert watched == {"maassubscriptions", "maasauthpolicies", "maasmodelrefs"}
