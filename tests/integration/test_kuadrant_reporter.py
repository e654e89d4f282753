"""The Limitador reporter against the Limitador emulator: aggregation, discovery, outages, flush."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import replace

import aiohttp
import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2

from extproc.config import KuadrantConfig
from extproc.domain import Charge, Usage
from extproc.kuadrant import service
from extproc.kuadrant.descriptors import limit_identifier
from extproc.kuadrant.limitador import LimitadorLimits
from extproc.kuadrant.policies import limit_names
from extproc.kuadrant.reporter import Reporter
from extproc.observability.metrics import Metrics
from tests.limitador_emulator import LimitadorEmulator

DOMAIN = "llm/opt-kserve-route"
PATH = "/llm/opt/v1/chat/completions"
PREMIUM = limit_identifier("openshift-ingress", "gateway-token-rate-limits", "premium-user-tokens")


def token_limit(identifier: str, max_value: int = 50_000, seconds: int = 60) -> dict[str, object]:
    return {
        "namespace": DOMAIN,
        "max_value": max_value,
        "seconds": seconds,
        "name": identifier,
        "conditions": [f'descriptors[0]["{identifier}"] == "1"'],
        "variables": ['descriptors[0]["auth.identity.userid"]'],
    }


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limitador(clock: FakeClock) -> Iterator[LimitadorEmulator]:
    with LimitadorEmulator(clock=clock) as emulator:
        emulator.set_limits([token_limit(PREMIUM)])
        yield emulator


def charge(tokens: int, user: str = "bob", **fields: object) -> Charge:
    usage = Usage(total_tokens=tokens, estimated=bool(fields.pop("estimated", False)))
    return replace(Charge(user, "premium", "opt", usage, path=PATH, route=DOMAIN), **fields)  # type: ignore[arg-type]


def make_reporter(limitador: LimitadorEmulator, metrics: Metrics, **settings: object) -> Reporter:
    config = replace(
        KuadrantConfig(
            mode="all",
            limitador_grpc=limitador.grpc_target,
            limitador_http=limitador.http_url,
            batch_interval_s=0.02,
            flush_timeout_s=5.0,
        ),
        **settings,  # type: ignore[arg-type]
    )
    limits = LimitadorLimits(config.limitador_http, refresh_s=30, timeout_s=2)
    return Reporter(config, metrics, limits, limit_names(config, None), backoff_s=0.02)


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def until(condition: Callable[[], bool], what: str, attempts: int = 400) -> None:
    """Bounded polling: the condition, checked every 25 ms, at most ``attempts`` times."""
    for _ in range(attempts):
        if condition():
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"never happened: {what}")


# ----------------------------------------------------------------------------- the emulator


async def test_the_emulator_keeps_limitadors_semantics(
    limitador: LimitadorEmulator, clock: FakeClock
) -> None:
    limitador.set_limits([token_limit(PREMIUM, max_value=10, seconds=60)])
    entry = ratelimit_pb2.RateLimitDescriptor.Entry
    descriptor = ratelimit_pb2.RateLimitDescriptor(
        entries=[entry(key=PREMIUM, value="1"), entry(key="auth.identity.userid", value="bob")]
    )
    async with grpc.aio.insecure_channel(limitador.grpc_target) as channel:
        stub = service.RateLimitServiceStub(channel)

        async def call(method: str, hits: int) -> int:
            request = rls_pb2.RateLimitRequest(
                domain=DOMAIN, descriptors=[descriptor], hits_addend=hits
            )
            reply = await getattr(stub, method)(request)
            return int(reply.overall_code)

        assert await call("Report", 0) == rls_pb2.RateLimitResponse.OK  # 0 counts as 1
        assert limitador.counter(DOMAIN, PREMIUM, "bob") == 1
        assert await call("CheckRateLimit", 500) == rls_pb2.RateLimitResponse.OK  # adds nothing
        await call("Report", 9)
        assert limitador.counter(DOMAIN, PREMIUM, "bob") == 10
        assert await call("CheckRateLimit", 1) == rls_pb2.RateLimitResponse.OVER_LIMIT
        await call("Report", 5)  # Report adds whatever the limit says
        assert limitador.counter(DOMAIN, PREMIUM, "bob") == 15
        clock.now += 59.9
        assert await call("CheckRateLimit", 1) == rls_pb2.RateLimitResponse.OVER_LIMIT
        clock.now += 0.1  # the window started at the first hit
        assert await call("CheckRateLimit", 1) == rls_pb2.RateLimitResponse.OK
        limitador.fail(True)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call("Report", 1)
        assert failure.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_the_emulator_evaluates_limitadors_cel_not_the_sidecars_parsers(
    limitador: LimitadorEmulator,
) -> None:
    # Conditions as Limitador's own tests write them (limitador-server src/envoy_rls/server.rs:
    # `descriptors[0].x == '1'`), and `!=`: the sidecar's discovery takes neither shape.
    limitador.set_limits(
        [
            {
                **token_limit(PREMIUM, max_value=100),
                "name": "not-bob",
                "conditions": [
                    f"descriptors[0]['{PREMIUM}'] == '1'",
                    'descriptors[0]["auth.identity.userid"] != "bob"',
                ],
            },
            {
                **token_limit(PREMIUM, max_value=100),
                "name": "by-model",
                "conditions": ["descriptors[1].model == 'opt'"],
                "variables": ["descriptors[1].user"],
            },
        ]
    )
    with pytest.raises(ValueError, match="not one comparison"):
        limitador.set_limits([{**token_limit(PREMIUM), "conditions": ["a == 'x' && b == 'y'"]}])
    metrics = Metrics()
    reporter = make_reporter(limitador, metrics)
    try:
        reporter.submit(charge(5))
        await until(
            lambda: value(metrics, "maas_kuadrant_skipped_total", reason="conditions") >= 1,
            "the sidecar holds back",
        )
    finally:
        await reporter.close()
    assert limitador.reports == []
    entry = ratelimit_pb2.RateLimitDescriptor.Entry
    flags = [entry(key=PREMIUM, value="1"), entry(key="auth.identity.userid", value="carol")]
    labels = [entry(key="user", value="carol"), entry(key="model", value="opt")]
    request = rls_pb2.RateLimitRequest(
        domain=DOMAIN,
        descriptors=[
            ratelimit_pb2.RateLimitDescriptor(entries=flags),
            ratelimit_pb2.RateLimitDescriptor(entries=labels),
        ],
        hits_addend=7,
    )
    async with grpc.aio.insecure_channel(limitador.grpc_target) as channel:
        stub = service.RateLimitServiceStub(channel)
        assert (await stub.Report(request)).overall_code == rls_pb2.RateLimitResponse.OK
        unknown = rls_pb2.RateLimitRequest(descriptors=request.descriptors, hits_addend=1)
        assert (await stub.Report(unknown)).overall_code == rls_pb2.RateLimitResponse.UNKNOWN
    assert limitador.counter(DOMAIN, "not-bob", "carol") == 7
    assert limitador.counter(DOMAIN, "by-model", "carol") == 7


async def test_the_limits_api_takes_the_namespace_as_one_encoded_segment(
    limitador: LimitadorEmulator,
) -> None:
    async with aiohttp.ClientSession() as session:
        encoded = f"{limitador.http_url}/limits/{urllib.parse.quote(DOMAIN, safe='')}"
        async with session.get(encoded) as reply:
            listed = await reply.json()
        async with session.get(f"{limitador.http_url}/limits/{DOMAIN}") as raw:
            assert raw.status == 404  # a "/" in the path is not part of the namespace
    assert listed == [{"id": None, **token_limit(PREMIUM)}]


# ----------------------------------------------------------------------------- the reporter


async def test_hits_of_one_counter_are_summed_into_few_reports(
    limitador: LimitadorEmulator,
) -> None:
    metrics = Metrics()
    reporter = make_reporter(limitador, metrics)
    reporter.start()
    try:
        for tokens in range(1, 21):
            reporter.submit(charge(tokens))
        reporter.submit(charge(0))  # nothing to report: Report would count it as 1
        reporter.submit(charge(5, user="carol"))
        await until(lambda: limitador.counter(DOMAIN, PREMIUM, "bob") >= 210, "bob's 210 tokens")
        await until(lambda: limitador.counter(DOMAIN, PREMIUM, "carol") >= 5, "carol's 5")
    finally:
        await reporter.close()
    assert limitador.counter(DOMAIN, PREMIUM, "bob") == 210
    assert limitador.counter(DOMAIN, PREMIUM, "carol") == 5
    assert len(limitador.reports) < 21
    labels = {dict(r.labels)["user"]: dict(r.labels) for r in limitador.reports}
    assert labels["bob"] == {"user": "bob", "tier": "premium", "model": "opt"}
    assert value(metrics, "maas_kuadrant_reports_total", result="sent") == len(limitador.reports)


async def test_gaps_mode_reports_only_what_the_wasm_filter_charges_zero(
    limitador: LimitadorEmulator,
) -> None:
    metrics = Metrics()
    reporter = make_reporter(limitador, metrics, mode="gaps")
    try:
        reporter.submit(charge(100))  # complete, with usage: the wasm filter's to report
        reporter.submit(charge(7, disconnected=True))
        reporter.submit(charge(11, estimated=True))
        reporter.submit(charge(13, status=503))  # usage in an error body: the wasm filter's too
        reporter.submit(charge(17, status=503, disconnected=True))
        await until(lambda: limitador.total_hits() >= 35, "the three gaps")
        await until(lambda: reporter.depth == 0, "nothing left to send")
    finally:
        await reporter.close()
    assert limitador.counter(DOMAIN, PREMIUM, "bob") == 35


async def test_nothing_is_reported_blind(limitador: LimitadorEmulator) -> None:
    metrics = Metrics()
    reporter = make_reporter(limitador, metrics)
    try:
        reporter.submit(charge(5, tier="free"))  # no free-user-tokens limit in the domain
        reporter.submit(charge(5, route=""))  # admission found no HTTPRoute
        reporter.submit(charge(5, route="other/route-kserve-route"))  # no limits there
        await until(
            lambda: (
                sum(
                    value(metrics, "maas_kuadrant_skipped_total", reason=r)
                    for r in ("no_limit", "no_route")
                )
                >= 3
            ),
            "three skips",
        )
    finally:
        await reporter.close()
    assert value(metrics, "maas_kuadrant_skipped_total", reason="no_limit") == 2
    assert value(metrics, "maas_kuadrant_skipped_total", reason="no_route") == 1
    assert limitador.reports == []


async def test_an_outage_queues_reports_until_limitador_returns(
    limitador: LimitadorEmulator,
) -> None:
    metrics = Metrics()
    reporter = make_reporter(limitador, metrics)
    limitador.fail(True)
    try:
        reporter.submit(charge(40))
        await until(
            lambda: value(metrics, "maas_kuadrant_reports_total", result="failed") >= 2,
            "retries while Limitador is down",
        )
        reporter.submit(charge(2))
        assert limitador.counter(DOMAIN, PREMIUM, "bob") == 0
        limitador.fail(False)
        await until(lambda: limitador.counter(DOMAIN, PREMIUM, "bob") >= 42, "delivery")
        await until(lambda: reporter.depth == 0, "an empty queue")
    finally:
        await reporter.close()
    assert limitador.counter(DOMAIN, PREMIUM, "bob") == 42
    assert value(metrics, "maas_kuadrant_reports_total", result="dropped") == 0
    assert value(metrics, "maas_kuadrant_queue_depth") == 0


async def test_what_overflows_the_queue_during_an_outage_is_dropped_and_counted(
    limitador: LimitadorEmulator,
) -> None:
    metrics = Metrics()
    reporter = make_reporter(limitador, metrics, queue_size=3)
    limitador.fail(True)
    try:
        reporter.submit(charge(100))  # taken off the queue, then retried
        await until(
            lambda: value(metrics, "maas_kuadrant_reports_total", result="failed") >= 1,
            "a failed attempt",
        )
        for tokens in (1, 2, 3, 4, 5):  # three fit in the queue, two do not
            reporter.submit(charge(tokens))
        assert value(metrics, "maas_kuadrant_reports_total", result="dropped") == 2
        limitador.fail(False)
        await until(lambda: limitador.counter(DOMAIN, PREMIUM, "bob") >= 106, "delivery")
    finally:
        await reporter.close()
    assert limitador.counter(DOMAIN, PREMIUM, "bob") == 106


async def test_close_flushes_what_is_queued_and_drops_the_rest_after_its_bound(
    limitador: LimitadorEmulator,
) -> None:
    metrics = Metrics()
    reporter = make_reporter(limitador, metrics, batch_interval_s=5.0)
    reporter.submit(charge(9))
    await reporter.close()  # does not wait out the batch interval
    assert limitador.counter(DOMAIN, PREMIUM, "bob") == 9

    stuck = make_reporter(limitador, metrics, flush_timeout_s=0.2)
    limitador.fail(True)
    stuck.submit(charge(4))
    await stuck.close()
    assert value(metrics, "maas_kuadrant_reports_total", result="dropped") == 1
    assert limitador.counter(DOMAIN, PREMIUM, "bob") == 9
