"""Kuadrant feeding, pure parts: descriptors, domains, limit discovery, policy predicates, config."""

from __future__ import annotations

import hashlib

import pytest

from extproc.config import LimitsConfig, parse
from extproc.domain import Charge, Limits, Usage
from extproc.errors import ConfigError
from extproc.kuadrant.descriptors import (
    limit_identifier,
    metric_labels,
    parse_condition,
    parse_variable,
    report_entries,
    subscription_limit,
)
from extproc.kuadrant.limitador import LimitadorLimit, match_limit
from extproc.kuadrant.policies import (
    merged,
    policy_limits,
    predicate_selects,
    tier_of,
    window_seconds,
)
from extproc.kuadrant.reporter import build_request, is_gap

USERID = 'descriptors[0]["auth.identity.userid"]'


def flag(identifier: str) -> str:
    return f'descriptors[0]["{identifier}"] == "1"'


def test_the_documented_identifier_example() -> None:
    assert limit_identifier("testNS", "trlpA", "foo") == "tokenlimit.foo__13adad8e"


def test_limit_names_are_sanitised_but_hashed_as_written() -> None:
    identifier = limit_identifier(
        "openshift-ingress", "gateway-token-rate-limits", "free-user.tokens"
    )
    name, digest = identifier.removeprefix("tokenlimit.").split("__")
    assert name == "free_user_tokens"
    assert len(digest) == 8
    assert identifier != limit_identifier(
        "openshift-ingress", "gateway-token-rate-limits", "free_user_tokens"
    )
    assert limit_identifier("ns", "p", "a", prefix="limit").startswith("limit.a__")


def test_limit_names_keep_letters_and_digits_of_every_script_as_go_does() -> None:
    # Go's unicode.IsLetter / IsDigit (kuadrant-operator TokenLimitNameToLimitadorIdentifier):
    # letters and decimal digits of any script stay, everything else (here "-", " ", "²") is "_".
    identifier = limit_identifier("ns", "policy", "frée-ü1 ٣²x")
    assert identifier.startswith("tokenlimit.frée_ü1_٣_x__")
    digest = hashlib.sha256("ns/policy/frée-ü1 ٣²x".encode()).hexdigest()[:8]
    assert identifier == f"tokenlimit.frée_ü1_٣_x__{digest}"


def test_conditions_and_variables_parse_only_the_descriptor_shape() -> None:
    assert parse_condition(flag("tokenlimit.x__1")) == ("tokenlimit.x__1", "1")
    assert parse_condition("descriptors[0]['k'] == 'v'") == ("k", "v")
    assert parse_condition('auth.identity.tier == "free"') is None
    assert parse_variable(USERID) == "auth.identity.userid"
    assert parse_variable("auth.identity.userid") is None


def test_report_requests_carry_the_flag_the_counter_and_the_labels() -> None:
    entries = report_entries("tokenlimit.a__1", (("auth.identity.userid", "bob"),))
    request = build_request("ns/route", entries, metric_labels("bob", "premium", "m"), 42)
    assert request.domain == "ns/route"
    assert request.hits_addend == 42
    first = [(e.key, e.value) for e in request.descriptors[0].entries]
    assert first == [("tokenlimit.a__1", "1"), ("auth.identity.userid", "bob")]
    second = [(e.key, e.value) for e in request.descriptors[1].entries]
    assert second == [("user", "bob"), ("tier", "premium"), ("model", "m")]


def test_the_limit_is_found_by_its_flag_condition() -> None:
    identifier = limit_identifier(
        "openshift-ingress", "gateway-token-rate-limits", "free-user-tokens"
    )
    other = limit_identifier(
        "openshift-ingress", "gateway-token-rate-limits", "premium-user-tokens"
    )
    limits = [
        LimitadorLimit("ns/r", 50000, 60, "p", (flag(other),), (USERID,)),
        LimitadorLimit("ns/r", 100, 60, "f", (flag(identifier),), (USERID,)),
    ]
    target = match_limit(limits, identifier, "auth.identity.userid")
    assert (target.reason, target.variables) == ("", ("auth.identity.userid",))
    assert match_limit(limits[:1], identifier, "auth.identity.userid").reason == "no_limit"


def test_limits_we_cannot_fill_in_are_not_reported() -> None:
    identifier = "tokenlimit.a__00000000"
    by_group = LimitadorLimit("ns/r", 1, 60, "", (flag(identifier),), ('descriptors[0]["g"]',))
    assert match_limit([by_group], identifier, "auth.identity.userid").reason == "variables"
    extra = LimitadorLimit("ns/r", 1, 60, "", (flag(identifier), flag("other")), (USERID,))
    assert match_limit([extra], identifier, "auth.identity.userid").reason == "conditions"
    shared = LimitadorLimit("ns/r", 1, 60, "", (flag(identifier),), ())
    assert match_limit([shared], identifier, "auth.identity.userid").variables == ()


def test_gaps_are_what_the_wasm_filter_charges_zero() -> None:
    reported = Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7)
    assert not is_gap(Charge("u", "free", "m", reported))
    assert is_gap(Charge("u", "free", "m", reported, disconnected=True))
    assert is_gap(Charge("u", "free", "m", Usage(total_tokens=9, estimated=True)))
    # The wasm filter charges any response whose body carries usage, whatever the status.
    assert not is_gap(Charge("u", "free", "m", reported, status=500))
    assert not is_gap(Charge("u", "free", "m", reported, status=429))


# ----------------------------------------------------------------------------- policies


def seed(limits: dict[str, object], **spec: object) -> dict[str, object]:
    return {
        "metadata": {"namespace": "openshift-ingress", "name": "gateway-token-rate-limits"},
        "spec": {"limits": limits, **spec},
    }


def tier_limit(tier: str, limit: int, window: str = "1m", **extra: object) -> dict[str, object]:
    return {
        "rates": [{"limit": limit, "window": window}],
        "when": [{"predicate": f'auth.identity.tier == "{tier}"'}],
        "counters": [{"expression": "auth.identity.userid"}],
        **extra,
    }


def test_tier_predicates_are_understood_in_their_one_shape() -> None:
    assert tier_of('auth.identity.tier == "free"') == "free"
    assert tier_of("auth.identity.tier=='premium'") == "premium"
    assert tier_of('auth.identity.tier != "free"') is None
    assert tier_of('auth.identity.tier == "free" && request.path != "/x"') is None
    assert tier_of('auth.identity.groups.exists(g, g == "x")') is None


def test_windows_parse_as_gateway_durations() -> None:
    assert [window_seconds(w) for w in ("1m", "30s", "2h", "1h30m", "0s", "5", "")] == [
        60,
        30,
        7200,
        5400,
        None,
        None,
        None,
    ]


def test_the_seed_policy_becomes_per_tier_token_limits() -> None:
    policy = seed(
        {
            "free-user-tokens": tier_limit("free", 200),
            "premium-user-tokens": tier_limit("premium", 60000, "2m"),
        }
    )
    found, ignored = policy_limits(policy, "tokens", "auth.identity.userid")
    assert ignored == []
    assert {(i.name, i.tier, i.limit, i.window_s) for i in found} == {
        ("free-user-tokens", "free", 200, 60),
        ("premium-user-tokens", "premium", 60000, 120),
    }
    config = merged(LimitsConfig(), found)
    assert config.tiers["free"] == Limits(requests=5, requests_window_s=120, tokens=200)
    assert config.tiers["premium"].tokens_window_s == 120
    assert config.tiers["enterprise"].tokens == 100_000  # not declared: the configured limit


def test_predicates_not_understood_are_reported_never_guessed() -> None:
    policy = seed(
        {
            "ok": tier_limit("free", 10),
            "groups": {
                **tier_limit("x", 1),
                "when": [{"predicate": '"a" in auth.identity.groups'}],
            },
            "two": {**tier_limit("x", 1), "when": [{"predicate": "true"}, {"predicate": "true"}]},
            "shared": {**tier_limit("x", 1), "counters": []},
            "rates": {**tier_limit("x", 1), "rates": [{"limit": 1, "window": "1m"}] * 2},
        }
    )
    found, ignored = policy_limits(policy, "requests", "auth.identity.userid")
    assert [(i.name, i.kind) for i in found] == [("ok", "requests")]
    assert len(ignored) == 4
    assert all("gateway-token-rate-limits limit" in reason for reason in ignored)
    # A top-level `when` is ANDed to every limit's predicates, as Kuadrant does.
    limits = {"ok": tier_limit("free", 10)}
    _, top = policy_limits(
        seed(limits, when=[{"predicate": "x"}]), "tokens", "auth.identity.userid"
    )
    assert len(top) == 1
    exempt = [{"predicate": '!request.path.endsWith("/v1/models")'}]
    found, top = policy_limits(seed(limits, when=exempt), "tokens", "auth.identity.userid")
    assert ([i.tier for i in found], top) == (["free"], [])


@pytest.mark.parametrize(
    ("predicates", "tier"),
    [
        # models-as-a-service ae050cb6, deployment/base/policies/usage-policies/token-limit-policy.yaml
        (['auth.identity.tier == "free" && !request.path.endsWith("/v1/models")'], "free"),
        (["auth.identity.tier == 'premium' && !request.path.endsWith('/v1/models')"], "premium"),
        (['(auth.identity.tier == "free") && (!request.path.endsWith("/v1/models"))'], "free"),
        (['auth.identity.tier == "free"', '!(request.path.endsWith("/v1/models"))'], "free"),
        (['auth.identity.tier == "free"\n'], "free"),  # 1282feb5 wrote `predicate: |`
        (['auth.identity.tier == "free" && !request.path.endsWith("/chat/completions")'], None),
        (['auth.identity.tier == "free" && !request.path.endsWith("/completions")'], None),
        (['auth.identity.tier == "free" && request.path.endsWith("/v1/models")'], None),
        (['auth.identity.tier == "free" || !request.path.endsWith("/v1/models")'], None),
        (['auth.identity.tier == "free" && auth.identity.tier == "premium"'], None),
        (['auth.identity.tier == "free" && request.method == "POST"'], None),
        # kuadrant.mode all: a term the data plane never satisfies marks a sidecar-only limit.
        (
            ['auth.identity.tier == "free"', '"x-maas-charged-by-kuadrant" in request.headers'],
            "free",
        ),
        (['auth.identity.tier == "free" && "x-other" in request.headers'], None),
        (['auth.identity.tier == "free" && request.headers["x-maas-a"] == "b"'], None),
        (['auth.identity.tier == "free" && (x'], None),
        (['!request.path.endsWith("/v1/models")'], None),
        ([], None),
    ],
)
def test_a_tier_predicate_may_come_with_terms_the_sidecar_enforces(
    predicates: list[str], tier: str | None
) -> None:
    body = {**tier_limit("x", 7), "when": [{"predicate": p} for p in predicates]}
    found, ignored = policy_limits(seed({"limit": body}), "tokens", "auth.identity.userid")
    assert [i.tier for i in found] == ([tier] if tier else [])
    assert len(ignored) == (0 if tier else 1)


def test_a_path_term_is_judged_against_the_charged_suffixes_in_force() -> None:
    body = {
        **tier_limit("x", 7),
        "when": [{"predicate": 'auth.identity.tier == "free" && !request.path.endsWith("/x")'}],
    }
    found, _ = policy_limits(seed({"l": body}), "tokens", "auth.identity.userid", ("/v1/y",))
    assert [i.tier for i in found] == ["free"]
    found, _ = policy_limits(seed({"l": body}), "tokens", "auth.identity.userid", ("/v1/x",))
    assert found == []


# ----------------------------------------------------------------------------- config


def test_kuadrant_config_defaults_and_errors() -> None:
    base = {"identity": {"api_keys_file": "k"}, "tiers": {"file": "t"}}
    config = parse(base).kuadrant
    assert (config.mode, config.policies) == ("off", "off")
    assert config.limitador_grpc == "limitador-limitador.kuadrant-system.svc:8081"
    names = parse({**base, "kuadrant": {"mode": "gaps", "limit_names": {"free": "f"}}}).kuadrant
    assert names.limit_names == (("free", "f"),)
    for bad, key in (
        ({"mode": "some"}, "kuadrant.mode"),
        ({"route_template": "{name}"}, "kuadrant.route_template"),
        ({"default_route": "nons"}, "kuadrant.default_route"),
        ({"limit_name_template": "fixed"}, "kuadrant.limit_name_template"),
        ({"queue_size": 0}, "kuadrant.queue_size"),
    ):
        with pytest.raises(ConfigError, match=key):
            parse({**base, "kuadrant": bad})


def test_without_generated_code_the_reporter_says_to_run_make_protos() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['extproc._gen'] = None\n"
        "try:\n    import extproc.kuadrant.reporter\n"
        "except ImportError as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "run `make protos`" in out.stdout


KEY = "models-as-a-service/sub@llm/facebook-opt-125m-simulated"


@pytest.mark.parametrize(
    ("predicate", "selected"),
    [
        (
            f'auth.identity.selected_subscription_key == "{KEY}" && !request.path.endsWith("/v1/models")',
            ("subscription", KEY),
        ),
        (f"auth.identity.selected_subscription_key == '{KEY}'", ("subscription", KEY)),
        ('auth.identity.tier == "free" && !request.path.endsWith("/v1/models")', ("tier", "free")),
        (f'auth.identity.selected_subscription_key == "{KEY}" || true', None),
        (f'auth.identity.selected_subscription_key != "{KEY}"', None),
        (
            f'auth.identity.selected_subscription_key == "{KEY}" && auth.identity.tier == "free"',
            None,
        ),
        (
            f'auth.identity.selected_subscription_key == "{KEY}" && request.path.endsWith("/v1/models")',
            None,
        ),
    ],
)
def test_what_a_predicate_selects(predicate: str, selected: tuple[str, str] | None) -> None:
    assert predicate_selects([predicate]) == selected


def test_subscription_limits_are_named_as_maas_names_them() -> None:
    assert subscription_limit(
        "models-as-a-service/simulator-subscription",
        "llm/facebook-opt-125m-simulated",
        "llm/facebook-opt-125m-simulated-kserve-route",
    ) == (
        "llm",
        "maas-trlp-facebook-opt-125m-simulated",
        "models-as-a-service-simulator-subscription-facebook-opt-125m-simulated-tokens",
    )
    assert metric_labels("u", "", "m", "ns/sub", "org", "") == (
        ("user", "u"),
        ("model", "m"),
        ("subscription", "sub"),
        ("organization_id", "org"),
    )
