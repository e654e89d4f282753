"""One request end to end: curl-like clients through a real Envoy, ext_authz and ext_proc."""

from __future__ import annotations

import json
import uuid

import httpx

from extproc.stack import LocalStack
from tests.e2e.support import ledger_tokens, quiet_sample, sample, sim_records
from tests.helpers import CHAT, KEYS


def post(
    stack: LocalStack, body: dict[str, object], key: str | None = "premium", **headers: str
) -> httpx.Response:
    all_headers = {k.replace("_", "-"): v for k, v in headers.items()}
    if key:
        all_headers["Authorization"] = f"Bearer {KEYS[key]}"
    return httpx.post(stack.url + CHAT, json=body, headers=all_headers, timeout=10)


def record_for(stack: LocalStack, model: str) -> dict[str, object]:
    matches = [r for r in sim_records(stack) if r["model"] == model]
    assert len(matches) == 1, matches
    return matches[0]


def messages(text: str = "count these five words please") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_non_streamed_charge_equals_the_simulator_record(stack: LocalStack) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    response = post(stack, {"model": model, "max_tokens": 7, "messages": messages()})
    assert response.status_code == 200
    usage = response.json()["usage"]
    served = record_for(stack, model)
    assert served["total_tokens"] == usage["total_tokens"] == 12
    assert ledger_tokens(stack, model, "total") == 12
    assert ledger_tokens(stack, model, "prompt") == 5
    assert ledger_tokens(stack, model, "completion") == 7
    assert response.headers["x-ratelimit-limit"]


def test_streamed_with_include_usage_charges_the_simulator_record(stack: LocalStack) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    body = {
        "model": model,
        "max_tokens": 9,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": messages("three words here"),
    }
    with httpx.stream(
        "POST",
        stack.url + CHAT,
        json=body,
        headers={"Authorization": f"Bearer {KEYS['premium']}"},
        timeout=10,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    usage = json.loads(events[-2][len("data: ") :])["usage"]
    served = record_for(stack, model)
    assert served["usage_sent"] is True
    assert served["total_tokens"] == usage["total_tokens"] == 12
    assert ledger_tokens(stack, model) == 12


def test_no_token_gets_401_with_a_bearer_challenge(stack: LocalStack) -> None:
    response = post(stack, {"model": "x", "messages": messages()}, key=None)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["error"]["code"] == "unauthenticated"
    bogus = httpx.post(
        stack.url + CHAT, json={}, headers={"Authorization": "Bearer not-a-key"}, timeout=10
    )
    assert bogus.status_code == 401


def test_spoofed_maas_headers_never_reach_the_upstream(stack: LocalStack) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    response = post(
        stack,
        {"model": model, "max_tokens": 1, "messages": messages()},
        x_maas_username="admin",
        x_maas_tier="enterprise",
        x_maas_anything="1",
    )
    assert response.status_code == 200
    headers = record_for(stack, model)["headers"]
    assert isinstance(headers, dict)
    assert headers["x-maas-username"] == "bob"
    assert headers["x-maas-tier"] == "premium"
    assert "x-maas-anything" not in headers
    assert "accept-encoding" not in headers  # charged bodies must come back uncompressed


def test_free_tier_over_its_token_limit_gets_429_with_retry_after(stack: LocalStack) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    body = {"model": model, "max_tokens": 60, "messages": messages("hi")}
    statuses = []
    for _ in range(3):
        response = post(stack, body, key="free")
        statuses.append(response.status_code)
    assert statuses == [200, 200, 429]  # 62 + 62 tokens used: the window's 100 are gone
    assert 1 <= int(response.headers["retry-after"]) <= 60
    error = response.json()["error"]
    assert error["limit"] == "tokens"
    assert "rate limit" in error["message"]
    assert sample(stack, "maas_limited_requests_total", limit="tokens", tier="free") >= 1
    assert len([r for r in sim_records(stack) if r["model"] == model]) == 2  # never reached it


def test_models_route_passes_uncharged(stack: LocalStack) -> None:
    charges_before = quiet_sample(stack, "maas_charges_total")
    path = "/llm/facebook-opt-125m-simulated/v1/models"
    for _ in range(7):  # more than the free tier's request limit
        response = httpx.get(
            stack.url + path, headers={"Authorization": f"Bearer {KEYS['free']}"}, timeout=10
        )
        assert response.status_code == 200
        assert response.json()["object"] == "list"
    assert quiet_sample(stack, "maas_charges_total") == charges_before  # none on its way either
    assert sample(stack, "maas_requests_total", decision="allow", tier="free") >= 7


def test_user_without_a_tier_gets_403(stack: LocalStack) -> None:
    response = post(stack, {"model": "x", "messages": messages()}, key="none")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "no_tier"


def test_cors_preflight_is_not_refused_for_lack_of_a_token(stack: LocalStack) -> None:
    response = httpx.options(
        stack.url + CHAT,
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "X-MaaS-Tier": "enterprise",
        },
        timeout=10,
    )
    # The simulator has no OPTIONS handler: its 405 shows the preflight reached the upstream
    # (ours would be 401 or 403, with a JSON error body).
    assert response.status_code == 405
    assert "unauthenticated" not in response.text
