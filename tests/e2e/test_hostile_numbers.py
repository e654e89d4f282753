"""Hostile numbers through a real Envoy (issue #13, items 1, 4 and 6): from a client, a 400 that
leaves the window alone; from an upstream, a capped estimate and no lock-out."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from extproc.stack import LocalStack
from tests.e2e.support import quiet_sample, sample
from tests.helpers import CHAT, KEYS

pytestmark = pytest.mark.e2e

ADMIN_KEY = "demo-admin-key"  # user admin, tier free: a free window of its own
PROMPT = '[{"role":"user","content":"hi"}]'


def post(stack: LocalStack, key: str, body: str | bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        stack.url + CHAT,
        content=body.encode() if isinstance(body, str) else body,
        headers={"authorization": f"Bearer {key}", "content-type": "application/json", **headers},
        timeout=30,
    )


def chat(model: str, max_tokens: str) -> str:
    """A chat request body with ``max_tokens`` written as the literal given."""
    return f'{{"model":"{model}","messages":{PROMPT},"max_tokens":{max_tokens}}}'


def new_model() -> str:
    return f"m-{uuid.uuid4().hex[:8]}"


def ledger_row(stack: LocalStack, key: str, model: str) -> dict[str, int] | None:
    """The caller's ledger row for ``model`` today, waiting a moment for it to land."""
    deadline = time.monotonic() + 3
    while True:
        response = httpx.get(
            f"http://127.0.0.1:{stack.usage_port}/v1/usage",
            params={"group_by": "model"},
            headers={"authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        rows = [row for row in response.json()["rows"] if row["model"] == model]
        if rows or time.monotonic() > deadline:
            return rows[0] if rows else None
        time.sleep(0.05)


def assert_our_400(response: httpx.Response, field: str = "max_tokens") -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "bad_request"  # ours, not the upstream's
    assert field in error["message"]


def test_max_tokens_10_30_is_refused_and_cannot_reset_the_free_window(stack: LocalStack) -> None:
    model = new_model()
    first = post(stack, KEYS["free"], chat(model, "60"))
    assert first.status_code == 200, first.text
    used = first.json()["usage"]["total_tokens"]
    assert 60 < used < 100
    # The attack: a bound larger than any reservation, on a request the upstream refuses.
    attack = post(stack, KEYS["free"], chat(model, str(10**30)), **{"x-sim-status": "400"})
    assert_our_400(attack)
    second = post(stack, KEYS["free"], chat(model, "60"))
    assert second.status_code == 200, second.text  # still under 100 when admitted
    third = post(stack, KEYS["free"], chat(model, "1"))
    assert third.status_code == 429, third.text  # the window holds both charges: > 100
    assert third.json()["error"]["limit"] == "tokens"


def test_max_tokens_10_400_is_a_400_and_no_lock_out(stack: LocalStack) -> None:
    model = new_model()
    attack = post(stack, ADMIN_KEY, chat(model, str(10**400)))
    assert_our_400(attack)
    after = post(stack, ADMIN_KEY, chat(model, "5"))
    assert after.status_code == 200, after.text


def test_json_nested_20000_levels_is_a_400(stack: LocalStack) -> None:
    body = b'{"model":"m","messages":' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    response = post(stack, KEYS["premium"], body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"] == "the request body is nested too deeply"
    assert "Traceback" not in stack.log("sidecar")


@pytest.mark.parametrize(
    ("total", "reason"), [(str(10**400), "too_large"), ("1e308", "too_large"), ("-5", "negative")]
)
def test_untrusted_upstream_usage_is_charged_a_capped_estimate_and_no_lock_out(
    stack: LocalStack, total: str, reason: str
) -> None:
    model = new_model()
    before = quiet_sample(stack, "maas_upstream_usage_invalid_total", reason=reason)
    usage = f'{{"prompt_tokens":1,"completion_tokens":5,"total_tokens":{total}}}'
    response = post(stack, KEYS["enterprise"], chat(model, "5"), **{"x-sim-usage": usage})
    assert response.status_code == 200, response.text
    assert total.encode() in response.content  # the client got what the upstream sent
    row = ledger_row(stack, KEYS["enterprise"], model)
    assert row is not None, "nothing was charged"
    assert 0 < row["total_tokens"] <= 5 + 1  # completion bound + prompt estimate ("hi": 1)
    assert row["estimated_tokens"] == row["total_tokens"]
    assert sample(stack, "maas_upstream_usage_invalid_total", reason=reason) == before + 1
    after = post(stack, KEYS["enterprise"], chat(new_model(), "5"))
    assert after.status_code == 200, after.text
    assert "Traceback" not in stack.log("sidecar")


def test_a_98_kb_gzip_bomb_is_charged_at_most_the_reservation(stack: LocalStack) -> None:
    model = new_model()
    bombs = sample(stack, "maas_upstream_usage_invalid_total", reason="decompression_bomb")
    script = {"x-sim-content-encoding": "gzip", "x-sim-pad-bytes": str(100 << 20)}
    headers = {
        "authorization": f"Bearer {KEYS['premium']}",
        "content-type": "application/json",
        **script,
    }
    with httpx.stream(
        "POST", stack.url + CHAT, content=chat(model, "5"), headers=headers, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-encoding"] == "gzip"
        wire = sum(len(chunk) for chunk in response.iter_raw())  # not inflated here
    assert wire < 110_000  # about 98 KB on the wire, 100 MiB inflated
    row = ledger_row(stack, KEYS["premium"], model)
    assert row is not None
    assert 0 < row["total_tokens"] <= 5 + 1
    assert row["estimated_tokens"] == row["total_tokens"]
    assert (
        sample(stack, "maas_upstream_usage_invalid_total", reason="decompression_bomb") == bombs + 1
    )
