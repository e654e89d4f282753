"""The accesslog layout's hand-over: what Envoy's usage rules write, the access log entry, the charge."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.data.accesslog.v3 import accesslog_pb2 as alog
from google.protobuf import struct_pb2

from extproc.accounting import envoy_usage
from extproc.config import AccountingConfig
from extproc.domain import Usage
from extproc.envoy import handover
from extproc.envoy.access_log import charge_of
from extproc.envoy.handover import Billing

FILTERS = Path(__file__).resolve().parents[2] / "deploy" / "local" / "filters.yaml"
# Where a usage object sits in an SSE event or a JSON body, per schema (the upstream formats).
USAGE_PREFIXES = (("usage",), ("message", "usage"), ("response", "usage"))
CHAT = "/llm/m/v1/chat/completions"
BILLING = Billing(
    request_id="r1",
    userid="bob",
    tier="premium",
    model="m",
    path=CHAT,
    reserved=40,
    windows=(1_000,),
    admitted_ms=1_000,
    prompt_estimate=6,
)


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(FILTERS.read_text())
    sse = doc["usage_sse"]["typed_config"]["response_rules"]["content_parser"]["typed_config"]
    json_rules = doc["usage_json"]["typed_config"]["response_rules"]["rules"]
    return [r["rule"] for r in sse["rules"]] + list(json_rules)


def test_the_rules_write_each_count_under_its_path_inside_usage() -> None:
    """Writer (filters.yaml) and reader (envoy_usage) agree on every key, for every rule."""
    written = set()
    for rule in rules():
        keys = tuple(s["key"] for s in rule["selectors"])
        prefix = next(p for p in USAGE_PREFIXES if keys[: len(p)] == p)
        target = rule["on_present"]
        assert target["metadata_namespace"] == envoy_usage.NAMESPACE
        assert target["key"] == ".".join(keys[len(prefix) :])
        assert target.get("type", "PROTOBUF_VALUE") == "PROTOBUF_VALUE"  # JSON types kept
        written.add(target["key"])
    assert written == envoy_usage.FIELDS


def entry(
    usage: dict[str, Any] | None = None,
    *,
    status: int = 200,
    body_bytes: int = 0,
    billing: Billing | None = BILLING,
    **flags: bool,
) -> alog.HTTPAccessLogEntry:
    """An entry as Envoy fills it (api/envoy/data/accesslog/v3/accesslog.proto)."""
    out = alog.HTTPAccessLogEntry()
    metadata = out.common_properties.metadata.filter_metadata
    if billing is not None:
        metadata[handover.METADATA_NAMESPACE].CopyFrom(handover.to_struct(billing))
    if usage is not None:
        found = struct_pb2.Struct()
        found.update(usage)
        metadata[envoy_usage.NAMESPACE].CopyFrom(found)
    out.common_properties.access_log_type = alog.AccessLogType.DownstreamEnd
    for name, value in flags.items():
        setattr(out.common_properties.response_flags, name, value)
    out.response.response_code.value = status
    out.response.response_body_bytes = body_bytes
    return out


def charged(e: alog.HTTPAccessLogEntry) -> Usage:
    charge = charge_of(e, AccountingConfig())
    assert charge is not None
    assert (charge.request_id, charge.userid, charge.reserved_tokens) == ("r1", "bob", 40)
    return charge.usage


def test_reported_openai_usage_is_charged_as_reported() -> None:
    usage = charged(entry({"prompt_tokens": 8, "completion_tokens": 12, "total_tokens": 20}))
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (8, 12, 20)
    assert not usage.estimated


def test_anthropic_counts_by_the_messages_schema() -> None:
    billing = replace(BILLING, path="/llm/m/v1/messages")
    e = entry(
        {"input_tokens": 8, "output_tokens": 6, "cache_read_input_tokens": 2}, billing=billing
    )
    assert charged(e).total_tokens == 16  # the prompt includes cache reads


def test_responses_api_details_are_nested_again() -> None:
    billing = replace(BILLING, path="/llm/m/v1/responses")
    fields = {
        "input_tokens": 5,
        "output_tokens": 7,
        "total_tokens": 12,
        "input_tokens_details.cached_tokens": 3,
    }
    usage = charged(entry(fields, billing=billing))
    assert (usage.total_tokens, usage.cached_tokens) == (12, 3)


@pytest.mark.parametrize(
    ("value", "reason"), [(-5, "negative"), (1.5, "fraction"), ("10", "not_a_number")]
)
def test_hostile_counts_are_a_capped_estimate(value: object, reason: str) -> None:
    usage = charged(entry({"total_tokens": value}, body_bytes=10_000))
    assert usage.invalid == reason
    assert usage.estimated
    assert usage.total_tokens == 40  # the reservation caps the estimate


def test_no_usage_on_success_is_a_flagged_estimate_from_the_bytes_sent() -> None:
    usage = charged(entry(body_bytes=20))
    assert usage.estimated
    assert (usage.prompt_tokens, usage.completion_tokens) == (6, 5)  # 20 bytes / 4


def test_a_client_that_left_is_flagged_as_a_disconnect() -> None:
    e = entry(body_bytes=20, downstream_connection_termination=True)
    charge = charge_of(e, AccountingConfig())
    assert charge is not None
    assert charge.disconnected
    assert charge.usage.estimated


def test_an_upstream_error_without_usage_costs_nothing() -> None:
    assert charged(entry(status=500, body_bytes=90)).total() == 0


def test_entries_without_a_billing_record_or_not_final_are_not_charged() -> None:
    assert charge_of(entry(billing=None), AccountingConfig()) is None
    periodic = entry({"total_tokens": 3})
    periodic.common_properties.access_log_type = alog.AccessLogType.DownstreamPeriodic
    assert charge_of(periodic, AccountingConfig()) is None


def test_a_list_where_a_count_belongs_is_not_trusted() -> None:
    odd = entry()
    namespace = odd.common_properties.metadata.filter_metadata[envoy_usage.NAMESPACE]
    namespace.fields["total_tokens"].list_value.values.add().number_value = 3
    usage = charged(odd)
    assert usage.invalid == "not_a_number"


def test_the_duration_is_envoys_time_to_the_last_byte_sent() -> None:
    e = entry({"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2})
    e.common_properties.time_to_last_downstream_tx_byte.FromMilliseconds(1234)
    charge = charge_of(e, AccountingConfig())
    assert charge is not None
    assert charge.duration_ms == 1234
    e.common_properties.ClearField("time_to_last_downstream_tx_byte")
    charge = charge_of(e, AccountingConfig())
    assert charge is not None
    assert charge.duration_ms == 0  # not in the entry: not measured
