"""The one table from admission outcomes to Envoy replies, and the metadata ext_proc reads back."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as authz
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from extproc.domain import Decision, Era, Identity, Outcome, Plan
from extproc.envoy import handover

METADATA_NAMESPACE = handover.METADATA_NAMESPACE

# outcome -> (HTTP status, gRPC code, error type as OpenAI clients expect it)
_TABLE: dict[Outcome, tuple[int, int, str]] = {
    Outcome.UNAUTHENTICATED: (401, code_pb2.UNAUTHENTICATED, "authentication_error"),
    Outcome.NO_TIER: (403, code_pb2.PERMISSION_DENIED, "permission_error"),
    Outcome.NO_SUBSCRIPTION: (403, code_pb2.PERMISSION_DENIED, "permission_error"),
    Outcome.FORBIDDEN: (403, code_pb2.PERMISSION_DENIED, "permission_error"),
    Outcome.SPOOFED: (403, code_pb2.PERMISSION_DENIED, "permission_error"),
    Outcome.RATE_LIMITED: (429, code_pb2.RESOURCE_EXHAUSTED, "rate_limit_exceeded"),
    Outcome.TOKEN_LIMITED: (429, code_pb2.RESOURCE_EXHAUSTED, "rate_limit_exceeded"),
    # 429, not 403: the refusal ends with the period (Retry-After says when), as OpenAI answers
    # "insufficient_quota" and MaaS/Kuadrant answer token limits (README "Budgets and quotas").
    Outcome.QUOTA_EXCEEDED: (429, code_pb2.RESOURCE_EXHAUSTED, "insufficient_quota"),
    Outcome.BAD_REQUEST: (400, code_pb2.INVALID_ARGUMENT, "invalid_request_error"),
    Outcome.UNAVAILABLE: (503, code_pb2.UNAVAILABLE, "service_unavailable"),
    Outcome.INVALID_PATH: (400, code_pb2.INVALID_ARGUMENT, "invalid_request_error"),
    Outcome.UNKNOWN_ROUTE: (404, code_pb2.NOT_FOUND, "invalid_request_error"),
    Outcome.INTERNAL_ERROR: (500, code_pb2.INTERNAL, "server_error"),
}

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# A quota refusal lasting longer than this tells SDKs not to retry it (they wait at most 60 s).
_SDK_RETRY_LIMIT_S = 60


@dataclass(frozen=True, slots=True)
class HeaderPolicy:
    """What an allowed request is told: the tier era's X-MaaS-Username and X-MaaS-Tier, or the
    subscription era's X-MaaS-Username, X-MaaS-Group (a JSON array) and X-MaaS-Subscription;
    ``identity`` off leaves the first two to MaaS's gateway AuthPolicy."""

    era: Era = "tiers"
    identity: bool = True


TIERS = HeaderPolicy()
_OK_STATUS = status_pb2.Status(code=code_pb2.OK)


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE
    )


Pairs = list[tuple[str, str]]  # header names and values, as the HTTP replies write them


def _options(pairs: Pairs) -> list[base_pb2.HeaderValueOption]:
    return [_header(key, value) for key, value in pairs]


def _rate_pairs(decision: Decision) -> Pairs:
    if decision.limit <= 0:
        return []
    return [
        ("x-ratelimit-limit", str(decision.limit)),
        ("x-ratelimit-remaining", str(max(decision.remaining, 0))),
        ("x-ratelimit-reset", str(decision.reset_s)),
    ]


def _rate_headers(decision: Decision) -> list[base_pb2.HeaderValueOption]:
    return _options(_rate_pairs(decision))


def error_body(decision: Decision) -> bytes:
    """A short OpenAI-shaped error, so SDKs show the reason."""
    _, _, kind = _TABLE[decision.outcome]
    error: dict[str, object] = {"type": kind, "code": decision.outcome.value}
    if decision.outcome in (Outcome.RATE_LIMITED, Outcome.TOKEN_LIMITED):
        what = "token" if decision.outcome is Outcome.TOKEN_LIMITED else "request"
        plan = decision.tier
        if plan is not None and plan.era == "subscriptions":
            whose = f"subscription {plan.name}" if plan.name else "requests without a subscription"
        else:
            whose = f"tier {plan.name if plan else '?'}"
        error["message"] = (
            f"{what} rate limit exceeded for {whose}: quota of {decision.limit} {what}s "
            f"per window used up; retry after {decision.retry_after_s}s"
        )
        error["limit"] = decision.limit_kind
        error["retry_after"] = decision.retry_after_s
    elif decision.outcome is Outcome.QUOTA_EXCEEDED:
        error["message"] = f"{decision.reason}; retry after {decision.retry_after_s}s"
        error["limit"] = decision.limit_kind
        error["retry_after"] = decision.retry_after_s
    else:
        error["message"] = decision.reason
    return json.dumps({"error": error}, separators=(",", ":")).encode()


def metadata(decision: Decision, path: str, policy: HeaderPolicy = TIERS) -> struct_pb2.Struct:
    """``identity`` for Kuadrant predicates; ``maas`` (``handover``) for our ext_proc to charge by."""
    identity = decision.identity
    tier = decision.tier
    out = struct_pb2.Struct()
    if identity is None or (tier is None and policy.era == "tiers"):
        return out
    identity_fields: dict[str, Any] = _identity_metadata(identity, tier)
    out.update({"identity": identity_fields})
    billing = handover.Billing.from_decision(decision, path)
    if billing is not None:
        handover.write(out.fields[handover.BILLING_KEY].struct_value.fields, billing)
    return out


def _identity_metadata(identity: Identity, plan: Plan | None) -> dict[str, str | list[str]]:
    """The tier era's ``{userid, tier, groups}``; in the subscription era the fields MaaS's
    gateway AuthPolicy gives ``auth.identity`` (maasauthpolicy_controller.go at c0639b1b)."""
    groups = list(identity.groups)
    if plan is not None and plan.era == "tiers":
        return {"userid": identity.userid, "tier": plan.name, "groups": groups}
    subscription = plan.name if plan is not None else ""
    return {
        "userid": identity.userid,
        "groups": groups,
        "groups_str": ",".join(groups),
        "keyId": identity.key_id,
        "keyName": identity.key_name,
        "selected_subscription": subscription.rpartition("/")[2],
        "selected_subscription_key": plan.selected_key if plan is not None else "",
    }


def check_response(
    decision: Decision, path: str, policy: HeaderPolicy = TIERS
) -> authz.CheckResponse:
    if decision.allowed:
        return _allow(decision, path, policy)
    status, code, _ = _TABLE[decision.outcome]
    headers = _refusal_headers(decision)
    return authz.CheckResponse(
        status=status_pb2.Status(code=code, message=decision.reason),
        denied_response=authz.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=headers,
            body=error_body(decision).decode(),
        ),
    )


def _identity_pairs(decision: Decision, policy: HeaderPolicy) -> Pairs:
    """The era's X-MaaS-* headers (``HeaderPolicy``); none for anonymous passes (CORS preflights)."""
    identity, plan = decision.identity, decision.tier
    if policy.era == "tiers":
        if identity is None or plan is None:
            return []
        return [("x-maas-username", identity.userid), ("x-maas-tier", plan.name)]
    if identity is None:
        return []
    headers = []
    if policy.identity:
        headers += [
            ("x-maas-username", identity.userid),
            ("x-maas-group", group_header(identity)),
        ]
    if plan is not None and plan.name:
        headers.append(("x-maas-subscription", plan.name))
    return headers


def _identity_headers(decision: Decision, policy: HeaderPolicy) -> list[base_pb2.HeaderValueOption]:
    return _options(_identity_pairs(decision, policy))


def group_header(identity: Identity) -> str:
    """X-MaaS-Group as MaaS writes it: a JSON array of strings; a token's groups led by
    ``system:authenticated`` (celTokenGroupsHeaderJSON), an API key's as stored with it."""
    groups = list(identity.groups)
    if not identity.key_id:
        groups.insert(0, "system:authenticated")
    return json.dumps(groups, separators=(",", ":"))


INJECT_HEADER = "x-maas-inject"  # ext_proc removes it again before the request goes upstream


def _request_pairs(decision: Decision, policy: HeaderPolicy) -> Pairs:
    headers = _identity_pairs(decision, policy)
    if decision.inject_usage:
        headers.append((INJECT_HEADER, "1"))
    return headers


def _request_headers(decision: Decision, policy: HeaderPolicy) -> list[base_pb2.HeaderValueOption]:
    return _options(_request_pairs(decision, policy))


def _allow(decision: Decision, path: str, policy: HeaderPolicy) -> authz.CheckResponse:
    ok = authz.OkHttpResponse(
        headers=_request_headers(decision, policy),
        headers_to_remove=_removals(decision.strip_headers, decision.charged),
        response_headers_to_add=_rate_headers(decision),
    )
    return authz.CheckResponse(
        status=_OK_STATUS, ok_response=ok, dynamic_metadata=metadata(decision, path, policy)
    )


class CheckReplies:
    """``check_response`` with the allow replies' fixed part built once per caller and copied.

    Headers, removals and the identity metadata depend only on who is calling; building them
    takes ~20 µs (protobuf Struct updates are pure Python), copying a prebuilt one ~3 µs.
    """

    def __init__(self, max_entries: int = 10_000, policy: HeaderPolicy = TIERS) -> None:
        self._bases: dict[tuple[object, ...], authz.CheckResponse] = {}
        self._max_entries = max_entries
        self._policy = policy

    def reply(self, decision: Decision, path: str) -> authz.CheckResponse:
        if not decision.allowed or decision.identity is None or decision.tier is None:
            return check_response(decision, path, self._policy)
        plan = decision.tier  # what the fixed part shows of it: its name (and model, for Kuadrant)
        key = (decision.identity, plan.name, plan.model, decision.strip_headers)
        base = self._bases.get(key)
        if base is None:
            if len(self._bases) >= self._max_entries:
                self._bases.clear()
            base = self._bases[key] = _allow(
                replace(decision, limit=0, charged=False, inject_usage=False), "", self._policy
            )
        out = authz.CheckResponse()
        out.CopyFrom(base)
        if decision.charged:
            out.ok_response.headers_to_remove.append("accept-encoding")
            billing = handover.Billing.from_decision(decision, path)
            if billing is not None:
                fields = out.dynamic_metadata.fields[handover.BILLING_KEY].struct_value.fields
                handover.write(fields, billing)
        if decision.inject_usage:
            out.ok_response.headers.append(_header(INJECT_HEADER, "1"))
        out.ok_response.response_headers_to_add.extend(_rate_headers(decision))
        return out


def _removals(spoofed: Iterable[str], charged: bool) -> list[str]:
    # Charged responses must arrive uncompressed so their usage can be read (CONTRACTS §7).
    return [*spoofed, "accept-encoding"] if charged else list(spoofed)


# ------------------------------------------------- the same answers as ext_proc replies (no ext_authz)


def _raw(options: list[base_pb2.HeaderValueOption]) -> list[base_pb2.HeaderValueOption]:
    """ext_proc reads header values from ``raw_value`` (ext_authz from ``value``)."""
    for option in options:
        option.header.raw_value = option.header.value.encode()
        option.header.value = ""
    return options


def _refusal_pairs(decision: Decision) -> Pairs:
    headers = [("content-type", "application/json")]
    if decision.reason_code:  # MaaS's error code, where its gateway policy sends one
        headers.append(("x-ext-auth-reason", decision.reason_code))
    if decision.outcome is Outcome.UNAUTHENTICATED:
        headers.append(("www-authenticate", 'Bearer realm="maas"'))
    if decision.retry_after_s:
        headers.append(("retry-after", str(decision.retry_after_s)))
        quota = decision.outcome is Outcome.QUOTA_EXCEEDED
        if quota and decision.retry_after_s > _SDK_RETRY_LIMIT_S:
            # The OpenAI and Anthropic SDKs retry a 429 on their own unless told not to.
            headers.append(("x-should-retry", "false"))
    headers.extend(_rate_pairs(decision))
    return headers


def _refusal_headers(decision: Decision) -> list[base_pb2.HeaderValueOption]:
    return _options(_refusal_pairs(decision))


def immediate_response(decision: Decision) -> ep.ProcessingResponse:
    """A refusal sent by ext_proc itself: the same status, headers and body as ext_authz sends."""
    status, _, _ = _TABLE[decision.outcome]
    return ep.ProcessingResponse(
        immediate_response=ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=ep.HeaderMutation(set_headers=_raw(_refusal_headers(decision))),
            body=error_body(decision),
            details=decision.outcome.value,
        )
    )


def request_mutation(
    decision: Decision, body_length: int = -1, policy: HeaderPolicy = TIERS
) -> ep.HeaderMutation:
    """What ext_authz's OK reply does to the request: our identity headers in, spoofed ones out."""
    headers = _identity_headers(decision, policy)
    if body_length >= 0:
        headers.append(_header("content-length", str(body_length)))
    return ep.HeaderMutation(
        set_headers=_raw(headers),
        remove_headers=_removals(decision.strip_headers, decision.charged),
    )


def response_mutation(decision: Decision) -> ep.HeaderMutation | None:
    """The remaining budget on the response, as ext_authz's ``response_headers_to_add``."""
    headers = _rate_headers(decision)
    return ep.HeaderMutation(set_headers=_raw(headers)) if headers else None


# ------------------------------------------------- the same answers for ext_authz over HTTP

# What Envoy's HTTP ext_authz client does with our reply's headers (its AuthorizationResponse
# settings in deploy/local/filters.yaml `ext_authz_http`): the identity headers go upstream, the
# rate headers to the client (on success too), the billing record into dynamic metadata, and
# ``x-envoy-auth-headers-to-remove`` lists the client headers to drop (envoyproxy/envoy
# api/envoy/service/auth/v3/external_auth.proto, ``OkHttpResponse.headers_to_remove``).
HEADERS_TO_REMOVE = "x-envoy-auth-headers-to-remove"
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden"}
_REASONS |= {429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


def http_response(status: int, headers: Iterable[tuple[str, str]], body: bytes = b"") -> bytes:
    """An HTTP/1.1 response, kept alive. A value that cannot be a header (a control character,
    beyond latin-1) raises ValueError: no value of ours may split the reply (RFC 9110 §5.5)."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    for name, value in headers:
        # Printable ASCII (the usual value) is always a field value; only others need the regex.
        if not (value.isascii() and value.isprintable()) and not _FIELD_VALUE.fullmatch(value):
            raise ValueError(f"not a header value for {name}")
        lines.append(f"{name}: {value}")
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


HIDE_HEADER = "x-maas-hide-usage"  # into metadata: the settle filter drops the injected usage


def http_reply(
    decision: Decision, path: str, policy: HeaderPolicy = TIERS, *, hide_usage: bool = False
) -> bytes:
    """``check_response`` for ext_authz's HTTP service: 200 admits, any other status refuses.
    ``hide_usage`` (``accounting.hide_injected_usage``) marks a rewritten stream for the `lean`
    settle filter, which then removes the usage chunk the client did not ask for."""
    if not decision.allowed:
        status, _, _ = _TABLE[decision.outcome]
        return http_response(status, _refusal_pairs(decision), error_body(decision))
    headers = [*_request_pairs(decision, policy), *_rate_pairs(decision)]
    removals = _removals(decision.strip_headers, decision.charged)
    if removals:
        headers.append((HEADERS_TO_REMOVE, ",".join(removals)))
    billing = handover.Billing.from_decision(decision, path)
    if billing is not None:
        headers.append((handover.BILLING_HEADER, handover.to_text(billing)))
        if hide_usage and billing.inject:
            headers.append((HIDE_HEADER, "1"))
    return http_response(200, headers)
