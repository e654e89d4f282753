"""The ext_authz -> ext_proc hand-over: what the writer puts in, the reader gets back, exactly."""

from __future__ import annotations

from dataclasses import replace

import pytest
from google.protobuf import struct_pb2

from extproc.domain import Decision, Identity, Outcome, Tier, Usage
from extproc.envoy import handover
from extproc.envoy.handover import METADATA_NAMESPACE, Billing
from extproc.envoy.replies import CheckReplies, check_response

ALICE = Identity("alice", "system:serviceaccount:ns:alice", ("g",))
FREE = Tier("free", 0, frozenset({"g"}))


def roundtrip(billing: Billing) -> Billing | None:
    struct = handover.to_struct(billing)
    wire = struct_pb2.Struct()
    wire.ParseFromString(struct.SerializeToString())  # as Envoy forwards it
    return handover.read({METADATA_NAMESPACE: wire})


@pytest.mark.parametrize("amount", [0, 1, 255, 2**53 - 1, 2**53 + 1, 2**63 - 1, 10**19 + 7])
def test_every_integer_travels_exactly(amount: int) -> None:
    billing = Billing(
        request_id="abc1",
        userid="a{b",
        tier="free",
        model="ns/m",
        path="/ns/m/v1/chat/completions",
        reserved=amount,
        windows=(amount, 1_800_000_000_123),
        admitted_ms=amount,
        inject=True,
        prompt_estimate=amount,
    )
    assert roundtrip(billing) == billing


def test_a_double_would_not_have_held_them() -> None:
    # Why integers travel as strings: the Struct number this replaced.
    assert int(float(2**53 + 1)) != 2**53 + 1


def test_no_windows_and_empty_strings_round_trip() -> None:
    billing = Billing("", "u", "", "", "", 0, ())
    assert roundtrip(billing) == billing


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("reserved", struct_pb2.Value(number_value=64)),  # the old number form
        ("reserved", struct_pb2.Value(string_value="-1")),
        ("reserved", struct_pb2.Value(string_value="1e3")),
        ("reserved", struct_pb2.Value(string_value="9" * 21)),
        ("windows", struct_pb2.Value(string_value="1,,2")),
        ("user", struct_pb2.Value(bool_value=True)),
    ],
)
def test_a_malformed_record_is_not_read(field: str, value: struct_pb2.Value) -> None:
    struct = handover.to_struct(Billing("id", "u", "t", "m", "/p", 5, (1,)))
    struct.fields[handover.BILLING_KEY].struct_value.fields[field].CopyFrom(value)
    assert handover.read({METADATA_NAMESPACE: struct}) is None


def test_what_check_writes_is_what_ext_proc_reads() -> None:
    decision = Decision(
        Outcome.ALLOW, identity=ALICE, tier=FREE, model="ns/m", charged=True,
        reserved_tokens=2**60 + 3, token_windows=(2**53 + 1,), inject_usage=True,
        prompt_estimate=12, request_id="r-1", admitted_ms=1_800_000_000_001,
    )  # fmt: skip
    expected = Billing.from_decision(decision, "/ns/m/v1/chat/completions")
    for reply in (
        check_response(decision, "/ns/m/v1/chat/completions"),
        CheckReplies().reply(decision, "/ns/m/v1/chat/completions"),
    ):
        got = handover.read({METADATA_NAMESPACE: reply.dynamic_metadata})
        assert got == expected
        assert got is not None
        assert got.reserved == 2**60 + 3


def test_uncharged_and_refused_decisions_hand_over_nothing() -> None:
    for decision in (
        Decision(Outcome.ALLOW, identity=ALICE, tier=FREE, charged=False),
        Decision(Outcome.TOKEN_LIMITED, identity=ALICE, tier=FREE, charged=True),
    ):
        assert Billing.from_decision(decision, "/p") is None


SUBSCRIBED = Billing(
    request_id="r9",
    userid="alice@example.com",
    tier="",
    model="llm/facebook-opt-125m-simulated",
    path="/llm/facebook-opt-125m-simulated/v1/chat/completions",
    reserved=300,
    windows=(1_800_000_000_000, 1_799_999_990_000),
    admitted_ms=1_800_000_000_123,
    route="llm/facebook-opt-125m-simulated-kserve-route",
    subscription="models-as-a-service/premium-subscription",
    key='bob\'s ci | key, "quoted"',
    organization_id="org-demo",
    cost_center="cc-4242",
    rate_windows=(60, 86_400),
    billing_rate=2 * 10**15 + 1,  # beyond a double's exact integers, as every count here
)


def test_the_subscription_and_key_round_trip() -> None:
    assert roundtrip(SUBSCRIBED) == SUBSCRIBED


def test_a_tier_record_carries_no_subscription_fields() -> None:
    struct = handover.to_struct(Billing("r", "u", "free", "m", "/p", 1, (2,)))
    written = set(struct.fields[handover.BILLING_KEY].struct_value.fields)
    assert not written & {"sub", "key", "org", "cc", "rate_windows", "rate"}


def test_a_subscription_without_billing_rate_hands_over_none() -> None:
    unpriced = replace(SUBSCRIBED, billing_rate=None)
    assert "rate" not in handover.to_struct(unpriced).fields[handover.BILLING_KEY].struct_value
    assert roundtrip(unpriced) == unpriced
    assert text_roundtrip(unpriced) == unpriced


@pytest.mark.parametrize("bad", ["", "-1", "0.5", "1e6", "9" * 21])
def test_a_billing_rate_that_is_not_a_count_is_not_ours(bad: str) -> None:
    struct = handover.to_struct(SUBSCRIBED)
    struct.fields[handover.BILLING_KEY].struct_value.fields["rate"].string_value = bad
    assert handover.read({METADATA_NAMESPACE: struct}) is None


def test_the_billing_rate_reaches_the_charge() -> None:
    charge = SUBSCRIBED.charge(Usage(1, 2, 3), 200)
    assert (charge.billing_rate, charge.cost_micros, charge.priced) == (2 * 10**15 + 1, 0, False)


@pytest.mark.parametrize("bad", ["60,,3600", "-60", "1m", "9" * 21])
def test_rate_windows_that_are_not_counts_are_not_ours(bad: str) -> None:
    struct = handover.to_struct(SUBSCRIBED)
    struct.fields[handover.BILLING_KEY].struct_value.fields["rate_windows"].string_value = bad
    assert handover.read({METADATA_NAMESPACE: struct}) is None


def text_roundtrip(billing: Billing) -> Billing | None:
    """Over HTTP: the header value as Envoy copies it into dynamic metadata (a string)."""
    wire = struct_pb2.Struct()
    wire.fields[handover.BILLING_HEADER].string_value = handover.to_text(billing)
    return handover.read({METADATA_NAMESPACE: wire})


@pytest.mark.parametrize("amount", [0, 2**53 + 1, 2**63 - 1])
def test_the_header_form_travels_exactly_and_stays_ascii(amount: int) -> None:
    billing = Billing(
        request_id="abc1",
        userid="zoë\r\nx-evil: 1",  # never a second header: escaped, ASCII only
        tier="free",
        model="ns/m",
        path="/ns/m/v1/chat/completions",
        reserved=amount,
        windows=(amount, 1_800_000_000_123),
        admitted_ms=amount,
        inject=True,
        prompt_estimate=amount,
        route="ns/r",
    )
    text = handover.to_text(billing)
    assert text.isascii()
    assert "\r" not in text
    assert "\n" not in text
    assert text_roundtrip(billing) == billing


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[]",
        '{"id": "x"}',  # keys missing
        handover.to_text(Billing("i", "u", "t", "m", "/p", 5, (1,))).replace('"5"', "5"),
        handover.to_text(Billing("i", "u", "t", "m", "/p", 5, (1,))).replace('"5"', '"-5"'),
    ],
)
def test_a_malformed_header_record_is_not_read(text: str) -> None:
    wire = struct_pb2.Struct()
    wire.fields[handover.BILLING_HEADER].string_value = text
    assert handover.read({METADATA_NAMESPACE: wire}) is None


def test_the_subscription_record_travels_as_a_header_too() -> None:
    assert text_roundtrip(SUBSCRIBED) == SUBSCRIBED
