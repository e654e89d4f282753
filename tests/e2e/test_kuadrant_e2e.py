"""Through a real Envoy: every token lands in Limitador (the emulator) exactly once, in each mode.

In ``gaps`` mode the test plays Kuadrant's wasm filter: it reports each complete response's usage
itself, through the same emulator, and the sidecar reports only the rest (aborted streams,
estimates). In ``all`` mode the sidecar is the only reporter.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator

import grpc
import httpx
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2

from extproc.kuadrant import service
from extproc.stack import LocalStack
from tests.e2e.support import sample, sim_records
from tests.helpers import KEYS
from tests.limitador_emulator import LimitadorEmulator

pytestmark = pytest.mark.e2e

PATH = "/llm/facebook-opt-125m-simulated/v1/chat/completions"
DOMAIN = "llm/facebook-opt-125m-simulated-kserve-route"
# limit_identifier("openshift-ingress", "gateway-token-rate-limits", "premium-user-tokens"),
# written out so the test checks the sidecar's descriptors against the documented rule.
_HASHED = b"openshift-ingress/gateway-token-rate-limits/premium-user-tokens"
PREMIUM = "tokenlimit.premium_user_tokens__" + hashlib.sha256(_HASHED).hexdigest()[:8]
MESSAGES = [{"role": "user", "content": "how many tokens does this take"}]


@pytest.fixture(scope="module")
def limitador() -> Iterator[LimitadorEmulator]:
    with LimitadorEmulator() as emulator:
        emulator.set_limits(
            [
                {
                    "namespace": DOMAIN,
                    "max_value": 50_000,
                    "seconds": 60,
                    "name": "premium-user-tokens",
                    "conditions": [f'descriptors[0]["{PREMIUM}"] == "1"'],
                    "variables": ['descriptors[0]["auth.identity.userid"]'],
                }
            ]
        )
        yield emulator


def start_stack(limitador: LimitadorEmulator, mode: str) -> LocalStack:
    return LocalStack(
        env={
            "MAAS_EXTPROC_KUADRANT_MODE": mode,
            "MAAS_EXTPROC_KUADRANT_LIMITADOR_GRPC": limitador.grpc_target,
            "MAAS_EXTPROC_KUADRANT_LIMITADOR_HTTP": limitador.http_url,
            "MAAS_EXTPROC_KUADRANT_BATCH_INTERVAL_S": "0.05",
        }
    ).start()


def until(condition: Callable[[], bool], what: str, attempts: int = 200) -> None:
    for _ in range(attempts):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def complete(stack: LocalStack, stream: bool) -> int:
    """A request answered in full, with usage; returns the usage the client saw."""
    body: dict[str, object] = {"model": "sim-model", "messages": MESSAGES, "max_tokens": 9}
    headers = {"Authorization": f"Bearer {KEYS['premium']}"}
    if not stream:
        reply = httpx.post(stack.url + PATH, json=body, headers=headers, timeout=20)
        assert reply.status_code == 200
        return int(reply.json()["usage"]["total_tokens"])
    usage = 0
    with httpx.stream(
        "POST", stack.url + PATH, json={**body, "stream": True}, headers=headers, timeout=20
    ) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if event.get("usage"):
                    usage = int(event["usage"]["total_tokens"])
    assert usage > 0  # the sidecar asked the stream for usage (include_usage injection)
    return usage


def gaps(stack: LocalStack) -> None:
    """Two responses Kuadrant's wasm filter charges 0: no usage reported, and an aborted stream."""
    headers = {"Authorization": f"Bearer {KEYS['premium']}"}
    body = {"model": "sim-model", "messages": MESSAGES, "max_tokens": 9}
    reply = httpx.post(
        stack.url + PATH, json=body, headers={**headers, "x-sim-omit-usage": "1"}, timeout=20
    )
    assert reply.status_code == 200
    with (
        httpx.stream(
            "POST",
            stack.url + PATH,
            json={**body, "stream": True},
            headers={**headers, "x-sim-abort-after": "3"},
            timeout=20,
        ) as aborted,
        contextlib.suppress(httpx.HTTPError),
    ):  # cut short upstream, no [DONE]
        for _ in aborted.iter_bytes():
            pass


def charged_total(stack: LocalStack) -> float:
    return sample(stack, "maas_tokens_total", kind="total")


def report_as_the_wasm_filter(limitador: LimitadorEmulator, tokens: int) -> None:
    entry = ratelimit_pb2.RateLimitDescriptor.Entry
    request = rls_pb2.RateLimitRequest(
        domain=DOMAIN,
        descriptors=[
            ratelimit_pb2.RateLimitDescriptor(
                entries=[
                    entry(key=PREMIUM, value="1"),
                    entry(key="auth.identity.userid", value="bob"),
                ]
            )
        ],
        hits_addend=tokens,
    )
    with grpc.insecure_channel(limitador.grpc_target) as channel:
        service.RateLimitServiceStub(channel).Report(request, timeout=5)


def test_all_mode_the_sidecar_reports_every_token_once(limitador: LimitadorEmulator) -> None:
    before = limitador.counter(DOMAIN, "premium-user-tokens", "bob")
    stack = start_stack(limitador, "all")
    try:
        seen = sum(complete(stack, stream) for stream in (False, True, False, True))
        until(lambda: charged_total(stack) >= seen, "the sidecar's charges")
        until(
            lambda: limitador.counter(DOMAIN, "premium-user-tokens", "bob") - before >= seen,
            "the reported tokens in Limitador",
        )
        assert limitador.counter(DOMAIN, "premium-user-tokens", "bob") - before == seen
        served = [r for r in sim_records(stack) if r["status"] == 200]
        assert sum(int(r["total_tokens"]) for r in served) == seen

        gaps(stack)
        until(lambda: len(sim_records(stack)) == 6, "the simulator's records")
        until(lambda: sample(stack, "maas_charges_total", source="estimated") >= 2, "estimates")
        total = charged_total(stack)
        until(
            lambda: limitador.counter(DOMAIN, "premium-user-tokens", "bob") - before >= total,
            "the estimates in Limitador",
        )
        assert total > seen  # the estimates cost something
        assert limitador.counter(DOMAIN, "premium-user-tokens", "bob") - before == total
        assert sample(stack, "maas_kuadrant_reports_total", result="dropped") == 0
    finally:
        stack.stop()


def test_gaps_mode_leaves_complete_responses_to_the_wasm_filter(
    limitador: LimitadorEmulator,
) -> None:
    before = limitador.counter(DOMAIN, "premium-user-tokens", "bob")
    sidecar_before = limitador.total_hits(labelled=True)
    stack = start_stack(limitador, "gaps")
    try:
        for stream in (False, True, True):
            report_as_the_wasm_filter(limitador, complete(stack, stream))
        gaps(stack)
        until(lambda: len(sim_records(stack)) == 5, "the simulator's records")
        until(lambda: sample(stack, "maas_charges_total", source="estimated") >= 2, "estimates")
        total = charged_total(stack)
        until(
            lambda: limitador.counter(DOMAIN, "premium-user-tokens", "bob") - before >= total,
            "every token in Limitador",
        )
        # Each token once: the wasm filter's part plus the sidecar's gaps, no more.
        assert limitador.counter(DOMAIN, "premium-user-tokens", "bob") - before == total
        complete_tokens = sum(
            int(r["total_tokens"]) for r in sim_records(stack) if r["completed"] and r["usage_sent"]
        )
        assert total > complete_tokens  # the gaps cost something
        assert limitador.total_hits(labelled=True) - sidecar_before == total - complete_tokens
    finally:
        stack.stop()
