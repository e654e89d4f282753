"""Admission over the real file identities, file tiers and in-memory store: every outcome."""

from __future__ import annotations

import json

import pytest
import yaml

from extproc.admission import AdmissionRequest, RequestBody, bearer_token
from extproc.config import parse
from extproc.domain import Charge, Outcome, Usage
from tests.helpers import CHAT, KEYS, LOCAL, Clock, build_admission, local_config


def request(
    tier: str | None = "premium",
    path: str = CHAT,
    method: str = "POST",
    body: dict[str, object] | None = None,
    **headers: str,
) -> AdmissionRequest:
    all_headers = {k.replace("_", "-"): v for k, v in headers.items()}
    if tier is not None:
        all_headers["authorization"] = f"Bearer {KEYS[tier]}"
    payload = json.dumps(body if body is not None else {"model": "m", "max_tokens": 10})
    return AdmissionRequest(method, path, all_headers, payload.encode())


async def test_allowed_request_carries_identity_tier_and_reservation() -> None:
    admission, _, _ = build_admission()
    decision = await admission.decide(request("premium"))
    assert decision.outcome is Outcome.ALLOW
    assert decision.identity is not None
    assert decision.identity.userid == "bob"
    assert decision.tier is not None
    assert decision.tier.name == "premium"
    assert decision.model == "m"
    assert decision.charged
    assert decision.reserved_tokens == 10  # max_tokens from the body
    assert decision.limit_kind == "requests"  # 19 of 20 requests left is the tightest budget
    assert decision.remaining == 19


@pytest.mark.parametrize("authorization", [None, "", "Bearer", "Basic abc", "Bearer nope"])
async def test_missing_or_bad_token_is_unauthenticated(authorization: str | None) -> None:
    admission, _, _ = build_admission()
    headers = {} if authorization is None else {"authorization": authorization}
    decision = await admission.decide(AdmissionRequest("POST", CHAT, headers))
    assert decision.outcome is Outcome.UNAUTHENTICATED
    assert decision.identity is None


async def test_user_without_tier_is_refused() -> None:
    admission, _, _ = build_admission()
    decision = await admission.decide(request("none"))
    assert decision.outcome is Outcome.NO_TIER


async def test_free_tier_request_limit_refuses_the_sixth_request() -> None:
    admission, _, _ = build_admission()
    small = {"model": "m", "max_tokens": 1}
    outcomes = [(await admission.decide(request("free", body=small))).outcome for _ in range(6)]
    assert outcomes == [Outcome.ALLOW] * 5 + [Outcome.RATE_LIMITED]


async def test_token_limit_refuses_once_the_window_is_used_up_and_resets_after_it() -> None:
    clock = Clock()
    admission, limiter, _ = build_admission(clock=clock)
    first = await admission.decide(request("free", body={"model": "m", "max_tokens": 60}))
    assert first.outcome is Outcome.ALLOW
    assert first.identity is not None
    await limiter.settle(
        Charge("alice", "free", "m", Usage(10, 90, 100), first.reserved_tokens, first.token_windows)
    )
    clock.advance(1)
    second = await admission.decide(request("free"))
    assert second.outcome is Outcome.TOKEN_LIMITED
    assert second.limit == 100
    assert 1 <= second.retry_after_s <= 60
    clock.advance(60)
    third = await admission.decide(request("free"))
    assert third.outcome is Outcome.ALLOW


ROUTE = "llm/facebook-opt-125m-simulated-kserve-route"  # the HTTPRoute KServe makes for CHAT
OTHER = "/llm/granite/v1/chat/completions"


@pytest.mark.parametrize("scope", ["user", "route"])
async def test_the_scope_decides_whether_each_model_route_has_its_own_budget(scope: str) -> None:
    config = local_config({"MAAS_EXTPROC_LIMITS_SCOPE": scope})
    admission, _, _ = build_admission(config)
    small = {"model": "m", "max_tokens": 1}
    for _ in range(5):  # the free tier's 5 requests, on one model route
        decision = await admission.decide(request("free", body=small))
        assert decision.outcome is Outcome.ALLOW
        assert decision.route == ROUTE
    elsewhere = await admission.decide(request("free", path=OTHER, body=small))
    # Per user, the budget is spent; per route, as Kuadrant counts, the other model has its own.
    expected = Outcome.RATE_LIMITED if scope == "user" else Outcome.ALLOW
    assert elsewhere.outcome is expected
    assert elsewhere.route == "llm/granite-kserve-route"
    again = await admission.decide(request("free", body=small))
    assert again.outcome is Outcome.RATE_LIMITED


async def test_a_body_model_request_spends_the_budget_of_its_models_route() -> None:
    raw = yaml.safe_load((LOCAL / "config.yaml").read_text())
    raw["limits"]["scope"] = "route"
    raw["access"]["body_models"] = {"opt": "llm/facebook-opt-125m-simulated"}
    admission, _, _ = build_admission(parse(raw, str(LOCAL)))
    by_body = {"model": "opt", "max_tokens": 1}
    for _ in range(5):
        decision = await admission.decide(
            request("free", path="/v1/chat/completions", body=by_body)
        )
        assert (decision.outcome, decision.route) == (Outcome.ALLOW, ROUTE)
    by_path = await admission.decide(request("free", body={"model": "m", "max_tokens": 1}))
    assert by_path.outcome is Outcome.RATE_LIMITED  # one HTTPRoute, one budget


async def test_a_charge_settles_into_the_route_it_was_admitted_on() -> None:
    clock = Clock()
    admission, limiter, _ = build_admission(
        local_config({"MAAS_EXTPROC_LIMITS_SCOPE": "route"}), clock=clock
    )
    first = await admission.decide(request("free", body={"model": "m", "max_tokens": 60}))
    assert first.identity is not None
    await limiter.settle(
        Charge(
            "alice",
            "free",
            "m",
            Usage(10, 90, 100),
            first.reserved_tokens,
            first.token_windows,
            route=first.route,
        )
    )
    clock.advance(1)
    assert (await admission.decide(request("free"))).outcome is Outcome.TOKEN_LIMITED
    assert (await admission.decide(request("free", path=OTHER))).outcome is Outcome.ALLOW


async def test_models_route_is_authenticated_but_never_limited_or_charged() -> None:
    admission, _, _ = build_admission()
    path = "/llm/facebook-opt-125m-simulated/v1/models"
    for _ in range(10):  # well past the free tier's 5 requests
        decision = await admission.decide(request("free", path=path, method="GET"))
        assert decision.outcome is Outcome.ALLOW
        assert not decision.charged
    anonymous = await admission.decide(AdmissionRequest("GET", path, {}))
    assert anonymous.outcome is Outcome.UNAUTHENTICATED


async def test_spoofed_maas_headers_are_stripped_but_ours_are_overwritten() -> None:
    admission, _, _ = build_admission()
    decision = await admission.decide(
        request("free", x_maas_username="admin", x_maas_tier="enterprise", x_maas_debug="1")
    )
    assert decision.outcome is Outcome.ALLOW
    assert decision.strip_headers == ("x-maas-debug",)
    assert decision.tier is not None
    assert decision.tier.name == "free"


async def test_spoofed_headers_can_be_rejected() -> None:
    config = local_config({"MAAS_EXTPROC_ROUTES_SPOOFED_HEADERS": "reject"})
    admission, _, _ = build_admission(config)
    decision = await admission.decide(request("free", x_maas_tier="enterprise"))
    assert decision.outcome is Outcome.SPOOFED


async def test_reservation_falls_back_to_the_configured_default() -> None:
    admission, _, _ = build_admission()
    decision = await admission.decide(request("premium", body={"model": "m"}))
    assert decision.reserved_tokens == 256


async def test_per_model_override_adds_its_own_counter() -> None:
    raw = {
        "identity": {"api_keys_file": str(LOCAL / "api-keys.yaml")},
        "tiers": {"file": str(LOCAL / "tiers.yaml")},
        "limits": {"models": {"premium": {"big": {"requests": 1}}}},
    }
    admission, _, _ = build_admission(parse(raw))
    assert (await admission.decide(request(body={"model": "big"}))).allowed
    refused = await admission.decide(request(body={"model": "big"}))
    assert refused.outcome is Outcome.RATE_LIMITED
    assert refused.limit == 1
    assert (await admission.decide(request(body={"model": "small"}))).allowed


@pytest.mark.parametrize(
    ("body", "model", "bound"),
    [
        (b'{"model": "a", "max_tokens": 7}', "a", 7),
        (b'{"model": "a", "max_completion_tokens": 9, "max_tokens": 7}', "a", 9),
        (b'{"max_output_tokens": 5}', "", 5),
        (b'{"max_tokens": null, "max_completion_tokens": 0}', "", None),
        (b'{"max_tokens": 12.0}', "", 12),
        (b"not json", "", None),
        (b"[1, 2]", "", None),
        (b"\xff\xfe", "", None),
        (b"", "", None),
    ],
)
def test_request_body_parsing_never_raises(body: bytes, model: str, bound: int | None) -> None:
    parsed = RequestBody.parse(body)
    assert (parsed.model, parsed.max_tokens, parsed.problem) == (model, bound, "")


HOSTILE_BOUNDS = [
    "-3",
    "1.5",
    '"10"',
    "true",
    "1e30",
    "1e400",
    "NaN",
    "-Infinity",
    "[5]",
    "{}",
    "1000001",
    str(10**30),
    str(10**400),
    "9" * 5000,  # past Python's int/str digit limit: json.loads alone would raise ValueError
]


@pytest.mark.parametrize("literal", HOSTILE_BOUNDS)
@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "max_output_tokens"])
def test_a_bound_that_is_not_a_count_within_the_limit_is_a_problem(
    field: str, literal: str
) -> None:
    body = f'{{"model": "m", "max_tokens": 5, "{field}": {literal}}}'.encode()
    parsed = RequestBody.parse(body, max_tokens=1_000_000)
    assert parsed.problem == f"{field}: expected a whole number from 0 to 1000000"


def test_json_nested_past_the_parser_depth_is_a_problem() -> None:
    deep = b'{"model": "m", "messages": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    assert RequestBody.parse(deep).problem == "the request body is nested too deeply"


@pytest.mark.parametrize("literal", ["10**30", "10**400", "nesting"])
async def test_hostile_bound_is_a_400_and_leaves_the_window_alone(literal: str) -> None:
    admission, _, _ = build_admission()
    first = await admission.decide(request("free", body={"model": "m", "max_tokens": 60}))
    assert first.outcome is Outcome.ALLOW
    if literal == "nesting":
        payload = b'{"model":"m","messages":' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    else:
        number = str(10**30 if literal == "10**30" else 10**400)
        payload = f'{{"model": "m", "max_tokens": {number}}}'.encode()
    headers = {"authorization": f"Bearer {KEYS['free']}"}
    decision = await admission.decide(AdmissionRequest("POST", CHAT, headers, payload))
    assert decision.outcome is Outcome.BAD_REQUEST
    assert decision.reserved_tokens == 0
    # The window still holds the first request's 60 tokens: 40 fit, then it is full.
    assert (await admission.decide(request("free", body={"model": "m", "max_tokens": 40}))).allowed
    refused = await admission.decide(request("free", body={"model": "m", "max_tokens": 1}))
    assert refused.outcome is Outcome.TOKEN_LIMITED


async def test_prompt_estimate_is_bounded_by_max_request_tokens() -> None:
    config = local_config({"MAAS_EXTPROC_LIMITS_MAX_REQUEST_TOKENS": "1000"})
    admission, _, _ = build_admission(config)
    prompt = [{"role": "user", "content": "word " * 10_000}]  # 50,000 chars: 12,500 tokens
    decision = await admission.decide(request(body={"model": "m", "messages": prompt}))
    assert decision.allowed
    assert decision.prompt_estimate == 1000


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None


async def test_cors_preflight_passes_anonymous_and_unbilled() -> None:
    admission, _, _ = build_admission()
    preflight = AdmissionRequest(
        "OPTIONS",
        CHAT,
        {"access-control-request-method": "POST", "origin": "https://app", "x-maas-tier": "x"},
    )
    decision = await admission.decide(preflight)
    assert decision.outcome is Outcome.ALLOW
    assert decision.identity is None
    assert not decision.charged
    assert decision.strip_headers == ("x-maas-tier",)
    plain_options = AdmissionRequest("OPTIONS", CHAT, {})
    assert (await admission.decide(plain_options)).outcome is Outcome.UNAUTHENTICATED


@pytest.mark.parametrize(
    "path",
    [
        CHAT + "/",
        CHAT + ";x",
        CHAT.replace("/v1/", "//v1/"),
        CHAT.replace("completions", "c%6fmpletions"),
    ],
)
async def test_every_spelling_of_a_charged_route_is_charged_under_its_one_reading(
    path: str,
) -> None:
    admission, _, _ = build_admission()
    decision = await admission.decide(request("premium", path=path))
    assert decision.outcome is Outcome.ALLOW
    assert decision.charged
    assert decision.path == CHAT  # what the Kuadrant domain and the extractor choice read


@pytest.mark.parametrize(
    ("method", "path", "outcome"),
    [
        ("POST", CHAT + "z", Outcome.UNKNOWN_ROUTE),
        ("GET", CHAT, Outcome.UNKNOWN_ROUTE),  # a charged path is charged only as a POST
        ("POST", "/v1/invocations", Outcome.UNKNOWN_ROUTE),
        ("POST", "/llm/facebook-opt-125m-simulated/pooling", Outcome.UNKNOWN_ROUTE),
        ("POST", CHAT.replace("chat/", "chat%2F"), Outcome.INVALID_PATH),
        ("POST", CHAT + "/..;x/completions", Outcome.INVALID_PATH),
    ],
)
async def test_unclassifiable_model_paths_are_refused_not_passed_unbilled(
    method: str, path: str, outcome: Outcome
) -> None:
    admission, _, _ = build_admission()
    decision = await admission.decide(request("premium", path=path, method=method))
    assert decision.outcome is outcome
    anonymous = await admission.decide(AdmissionRequest(method, path, {}))
    assert anonymous.outcome is Outcome.UNAUTHENTICATED  # nothing is said before the token


async def test_unclassified_paths_pass_unbilled_when_configured() -> None:
    config = local_config({"MAAS_EXTPROC_ROUTES_UNCLASSIFIED": "pass"})
    admission, _, _ = build_admission(config)
    for path in (CHAT + "z", CHAT.replace("chat/", "chat%2F")):
        decision = await admission.decide(request("premium", path=path))
        assert decision.outcome is Outcome.ALLOW
        assert not decision.charged


async def test_paths_outside_a_model_prefix_pass_unbilled() -> None:
    admission, _, _ = build_admission()
    for path in ("/", "/health", "/llm/facebook-opt-125m-simulated"):
        decision = await admission.decide(request("premium", path=path, method="GET"))
        assert decision.outcome is Outcome.ALLOW, path
        assert not decision.charged
