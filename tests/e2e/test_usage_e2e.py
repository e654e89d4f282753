"""The usage API of a running sidecar answers what was charged through a real Envoy."""

from __future__ import annotations

import httpx
import pytest

from extproc.stack import LocalStack
from tests.helpers import CHAT, KEYS

pytestmark = pytest.mark.e2e

ADMIN = {"Authorization": "Bearer demo-admin-key"}


def bearer(tier: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tier]}"}


def chat(stack: LocalStack, tier: str, model: str) -> int:
    """One chat completion through Envoy; the total tokens the upstream reported."""
    body = {"model": model, "max_tokens": 6, "messages": [{"role": "user", "content": "hi there"}]}
    response = httpx.post(stack.url + CHAT, json=body, headers=bearer(tier), timeout=10)
    assert response.status_code == 200, response.text
    total: int = response.json()["usage"]["total_tokens"]
    return total


def test_usage_of_requests_through_envoy(stack: LocalStack) -> None:
    alice_tokens = chat(stack, "free", "usage-a") + chat(stack, "free", "usage-b")
    bob_tokens = chat(stack, "premium", "usage-a")
    api = httpx.Client(base_url=f"http://127.0.0.1:{stack.usage_port}", timeout=10)
    with api:
        own = api.get("/v1/usage", params={"group_by": "model"}, headers=bearer("free"))
        assert own.status_code == 200, own.text
        body = own.json()
        assert body["user"] == "alice"
        assert [row["model"] for row in body["rows"]] == ["usage-a", "usage-b"]
        assert body["totals"]["total_tokens"] == alice_tokens
        assert body["totals"]["requests"] == 2

        assert (
            api.get("/v1/usage", params={"user": "bob"}, headers=bearer("free")).status_code == 403
        )
        assert api.get("/v1/usage").status_code == 401

        listing = api.get("/v1/usage/users", headers=ADMIN)
        assert listing.status_code == 200
        totals = {row["user"]: row["total_tokens"] for row in listing.json()["rows"]}
        assert totals == {"alice": alice_tokens, "bob": bob_tokens}
        as_csv = api.get(
            "/v1/usage", params={"user": "bob"}, headers={**ADMIN, "Accept": "text/csv"}
        )
        # ... then the token kinds (none reported: empty cells), the cost (not priced) and 0 priced.
        assert as_csv.text.splitlines()[1].endswith(f",{bob_tokens},0,1,0,0,,,,,0")
