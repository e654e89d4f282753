"""The ext_authz -> ext_proc hand-over: the billing record written into and read from dynamic metadata.

ext_authz's Check answers with ``dynamic_metadata``; Envoy forwards it (namespace
``envoy.filters.http.ext_authz``) on the ext_proc stream of the same request, and puts it in the
request's access log entry. Over HTTP, ext_authz carries it as one header (``to_text``) that Envoy
copies into the same namespace. The writers and the reader live side by side here, with
round-trip tests (tests/unit/test_handover.py).

Integers travel as decimal strings: a protobuf ``Struct`` number is a double, which cannot hold
every integer (2**53 + 1 comes back as 2**53, and ``10**30`` comes back larger than it went in).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, cast

from google.protobuf import struct_pb2

from extproc.domain import Charge, Decision, Usage

METADATA_NAMESPACE = "envoy.filters.http.ext_authz"
BILLING_KEY = "maas"  # our own record; "identity" beside it is for Kuadrant predicates
# ext_authz over HTTP has no dynamic_metadata in its reply: the record travels as this response
# header, which Envoy copies into the same namespace (dynamic_metadata_from_headers) as a string.
BILLING_HEADER = "x-maas-billing"
_TEXT_KEYS = frozenset(
    ("id", "user", "tier", "model", "path", "reserved", "windows", "admitted", "inject")
) | {"prompt_est", "route", "sub", "key", "org", "cc", "rate_windows", "rate", "budgets", "bgroups"}
_MAX_DIGITS = 20  # every count we hand over fits in 64 bits; longer text is not ours


@dataclass(frozen=True, slots=True)
class Billing:
    """What the ext_proc stream needs to charge one admitted request."""

    request_id: str  # unique per admission; the settle is applied once per id
    userid: str
    tier: str
    model: str
    path: str
    reserved: int  # tokens held at admission: prompt estimate + completion bound
    windows: tuple[int, ...]  # start (ms) of each token window the reservation went into
    admitted_ms: int = 0  # admission time: its day holds the unsettled reservation
    inject: bool = False  # the request body is rewritten to ask the stream for usage
    prompt_estimate: int = 0
    route: str = ""  # the HTTPRoute admission counted the request in (Kuadrant's domain)
    # The subscription era (all "" in the tier era, where ``tier`` is set instead): the
    # subscription "<namespace>/<name>", the API key's name, the subscription's tokenMetadata,
    # and the window (seconds) of each token rate the reservation went into.
    subscription: str = ""
    key: str = ""
    organization_id: str = ""
    cost_center: str = ""
    rate_windows: tuple[int, ...] = ()
    # The subscription's billingRate.perToken for the model, in micro-units per million tokens.
    billing_rate: int | None = None
    # Budgets: whether admission reserved in them, and the caller's groups group budgets name.
    budgets_held: bool = False
    budget_groups: tuple[str, ...] = ()

    @classmethod
    def from_decision(cls, decision: Decision, path: str) -> Billing | None:
        """The record of an allowed, charged decision; None for everything else."""
        if not decision.allowed or not decision.charged:
            return None
        identity, plan = decision.identity, decision.tier
        if identity is None or plan is None:
            return None
        billing = cls(
            request_id=decision.request_id,
            userid=identity.userid,
            tier=plan.name,
            model=decision.model,
            path=path,
            reserved=decision.reserved_tokens,
            windows=decision.token_windows,
            admitted_ms=decision.admitted_ms,
            inject=decision.inject_usage,
            prompt_estimate=decision.prompt_estimate,
            route=decision.route,
            budgets_held=decision.budgets_held,
            budget_groups=decision.budget_groups,
        )
        if plan.era == "tiers":
            return billing
        return replace(
            billing,
            tier="",
            subscription=plan.name,
            key=identity.key_name,
            organization_id=plan.organization_id,
            cost_center=plan.cost_center,
            rate_windows=tuple(rate.window_s for rate in plan.rates),
            billing_rate=plan.billing_rate,
        )

    def charge(
        self, usage: Usage, status: int, *, disconnected: bool = False, duration_ms: int = 0
    ) -> Charge:
        """The charge of this request's response: ``usage`` in place of the reservation."""
        return Charge(
            userid=self.userid,
            tier=self.tier,
            model=self.model,
            usage=usage,
            reserved_tokens=self.reserved,
            token_windows=self.windows,
            status=status,
            disconnected=disconnected,
            path=self.path,
            request_id=self.request_id,
            admitted_ms=self.admitted_ms,
            route=self.route,
            subscription=self.subscription,
            key_name=self.key,
            organization_id=self.organization_id,
            cost_center=self.cost_center,
            rate_windows=self.rate_windows,
            duration_ms=duration_ms,
            billing_rate=self.billing_rate,
            budgets_held=self.budgets_held,
            budget_groups=self.budget_groups,
        )


def _values(billing: Billing) -> dict[str, str | bool]:
    """The record's fields as ``write`` stores them; every integer as a string."""
    values: dict[str, str | bool] = {
        "id": billing.request_id,
        "user": billing.userid,
        "tier": billing.tier,
        "model": billing.model,
        "path": billing.path,
        "reserved": str(billing.reserved),
        "windows": ",".join(str(start) for start in billing.windows),
        "admitted": str(billing.admitted_ms),
        "inject": billing.inject,
        "prompt_est": str(billing.prompt_estimate),
        "route": billing.route,
    }
    if billing.subscription:  # the tier era's record stays as it was
        values["sub"] = billing.subscription
        values["key"] = billing.key
        values["org"] = billing.organization_id
        values["cc"] = billing.cost_center
        values["rate_windows"] = ",".join(map(str, billing.rate_windows))
        if billing.billing_rate is not None:
            values["rate"] = str(billing.billing_rate)
    if billing.budgets_held or billing.budget_groups:  # records without budgets stay as they were
        values["budgets"] = "1" if billing.budgets_held else "0"
        values["bgroups"] = json.dumps(list(billing.budget_groups))
    return values


def write(fields: Any, billing: Billing) -> None:
    """Fill a ``Struct``'s fields map (``maas``) with the record; every integer as a string."""
    for key, value in _values(billing).items():
        if isinstance(value, bool):
            fields[key].bool_value = value
        else:
            fields[key].string_value = value


def to_struct(billing: Billing) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    write(out.fields[BILLING_KEY].struct_value.fields, billing)
    return out


# Built once: ``json.dumps`` with any option set builds an encoder on every call.
_TEXT_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


def to_text(billing: Billing) -> str:
    """The record as one header value: ``write``'s fields as JSON strings, ASCII only."""
    values = _values(billing)
    values["inject"] = "1" if billing.inject else ""  # in place: the key keeps its position
    return _TEXT_ENCODER.encode(values)


def from_text(text: str) -> Billing | None:
    """``to_text``'s record, read as ``read`` reads the Struct form; None for anything else."""
    try:
        values = json.loads(text)
    except ValueError:
        return None
    if not isinstance(values, dict) or not values.keys() <= _TEXT_KEYS:
        return None
    for value in values.values():
        if not isinstance(value, str):
            return None
    return _from_plain(values)


def from_plain(namespace: Mapping[str, object]) -> Billing | None:
    """The record in ext_authz's namespace as plain values (the OpenTelemetry access log's
    attribute): the gRPC Check's ``maas`` object or HTTP's ``x-maas-billing`` text; None for
    anything else, as ``read``."""
    record = namespace.get(BILLING_KEY)
    if isinstance(record, Mapping):
        if not record.keys() <= _TEXT_KEYS:
            return None
        return _from_plain(record)
    text = namespace.get(BILLING_HEADER)
    return from_text(text) if isinstance(text, str) else None


def _from_plain(values: Mapping[str, object]) -> Billing | None:
    """``_from_fields`` for plain values: every field a string, ``inject`` a bool or "1".

    The callers have checked that every key is one of ``_TEXT_KEYS``, all of which are read
    here: so the types are checked once, up front, and the fields read as plain strings (every
    settle reads one record)."""
    for key, value in values.items():
        if not isinstance(value, str) and key != "inject":
            return None
    text = cast(Mapping[str, str], values)
    get = text.get
    inject = values.get("inject", False)
    try:
        windows_text = text["windows"]
        rate_windows = get("rate_windows", "")
        rate = get("rate")
        return Billing(
            request_id=text["id"],
            userid=text["user"],
            tier=text["tier"],
            model=text["model"],
            path=text["path"],
            reserved=_count(text["reserved"]),
            windows=tuple(_count(v) for v in windows_text.split(",")) if windows_text else (),
            admitted_ms=_count(text["admitted"]),
            inject=inject is True or inject == "1",
            prompt_estimate=_count(text["prompt_est"]),
            route=text["route"],
            subscription=get("sub", ""),
            key=get("key", ""),
            organization_id=get("org", ""),
            cost_center=get("cc", ""),
            rate_windows=tuple(_count(v) for v in rate_windows.split(",")) if rate_windows else (),
            billing_rate=_count(rate) if rate is not None else None,
            budgets_held=get("budgets") == "1",
            budget_groups=_groups(get("bgroups", "")),
        )
    except (KeyError, ValueError):
        return None


def read(filter_metadata: Mapping[str, struct_pb2.Struct]) -> Billing | None:
    """The record ext_authz left for this request, or None when there is none (or it is malformed).

    Only ext_authz can write this namespace (clients cannot), so a malformed record means a
    version mismatch between replicas: it is not billed by this stream, and the caller counts it.
    """
    struct = filter_metadata.get(METADATA_NAMESPACE)
    if struct is None:
        return None
    record = struct.fields.get(BILLING_KEY)
    if record is None:
        text = struct.fields.get(BILLING_HEADER)
        return from_text(text.string_value) if text is not None else None
    return _from_fields(record.struct_value.fields)


def _from_fields(fields: Any) -> Billing | None:
    try:
        windows_text = _text(fields, "windows")
        rate_windows = _text(fields, "rate_windows") if "rate_windows" in fields else ""
        return Billing(
            request_id=_text(fields, "id"),
            userid=_text(fields, "user"),
            tier=_text(fields, "tier"),
            model=_text(fields, "model"),
            path=_text(fields, "path"),
            reserved=_count(_text(fields, "reserved")),
            windows=tuple(_count(v) for v in windows_text.split(",")) if windows_text else (),
            admitted_ms=_count(_text(fields, "admitted")),
            inject=fields["inject"].bool_value if "inject" in fields else False,
            prompt_estimate=_count(_text(fields, "prompt_est")),
            route=_text(fields, "route"),
            subscription=_optional(fields, "sub"),
            key=_optional(fields, "key"),
            organization_id=_optional(fields, "org"),
            cost_center=_optional(fields, "cc"),
            rate_windows=tuple(_count(v) for v in rate_windows.split(",")) if rate_windows else (),
            billing_rate=_count(_text(fields, "rate")) if "rate" in fields else None,
            budgets_held=_optional(fields, "budgets") == "1",
            budget_groups=_groups(_optional(fields, "bgroups")),
        )
    except (KeyError, ValueError):
        return None


def _text(fields: Any, key: str) -> str:
    value = fields[key]
    if value.WhichOneof("kind") != "string_value":
        raise ValueError(key)
    text: str = value.string_value
    return text


def _optional(fields: Any, key: str) -> str:
    """A text field only the subscription era writes: "" when absent."""
    return _text(fields, key) if key in fields else ""


def _groups(text: str) -> tuple[str, ...]:
    """``bgroups``: a JSON array of strings ("" when there is none)."""
    if not text:
        return ()
    try:
        groups = json.loads(text)
    except RecursionError:
        raise ValueError("bgroups") from None
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise ValueError("bgroups")
    return tuple(groups)


def _count(text: str) -> int:
    """A non-negative integer written by ``write``; anything else is not ours."""
    if not text.isdigit() or not text.isascii() or len(text) > _MAX_DIGITS:
        raise ValueError(text)
    return int(text)
