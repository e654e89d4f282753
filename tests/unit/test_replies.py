"""The outcome -> Envoy reply table: statuses, headers, bodies and metadata."""

from __future__ import annotations

import json

import pytest
from google.protobuf import json_format
from google.rpc import code_pb2

from extproc.domain import Decision, Identity, Outcome, Tier
from extproc.envoy import handover
from extproc.envoy.handover import METADATA_NAMESPACE
from extproc.envoy.replies import check_response, http_reply, http_response

ALICE = Identity("alice", "alice", ("tier-free-users",))
FREE = Tier("free", 0, frozenset({"tier-free-users"}))


def headers_of(options: object) -> dict[str, str]:
    return {o.header.key: o.header.value for o in options}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("outcome", "status", "code"),
    [
        (Outcome.UNAUTHENTICATED, 401, code_pb2.UNAUTHENTICATED),
        (Outcome.NO_TIER, 403, code_pb2.PERMISSION_DENIED),
        (Outcome.FORBIDDEN, 403, code_pb2.PERMISSION_DENIED),
        (Outcome.SPOOFED, 403, code_pb2.PERMISSION_DENIED),
        (Outcome.RATE_LIMITED, 429, code_pb2.RESOURCE_EXHAUSTED),
        (Outcome.TOKEN_LIMITED, 429, code_pb2.RESOURCE_EXHAUSTED),
        (Outcome.UNAVAILABLE, 503, code_pb2.UNAVAILABLE),
        (Outcome.INVALID_PATH, 400, code_pb2.INVALID_ARGUMENT),
        (Outcome.UNKNOWN_ROUTE, 404, code_pb2.NOT_FOUND),
        (Outcome.BAD_REQUEST, 400, code_pb2.INVALID_ARGUMENT),
        (Outcome.INTERNAL_ERROR, 500, code_pb2.INTERNAL),
    ],
)
def test_every_refusal_has_a_status_and_a_json_reason(
    outcome: Outcome, status: int, code: int
) -> None:
    reply = check_response(Decision(outcome, "because"), "/p")
    assert reply.status.code == code
    assert reply.denied_response.status.code == status
    body = json.loads(reply.denied_response.body)
    assert body["error"]["code"] == outcome.value
    assert headers_of(reply.denied_response.headers)["content-type"] == "application/json"


def test_bad_request_is_an_openai_invalid_request_error() -> None:
    reason = "max_tokens: expected a whole number from 0 to 1000000"
    reply = check_response(Decision(Outcome.BAD_REQUEST, reason), "/p")
    error = json.loads(reply.denied_response.body)["error"]
    assert error == {"type": "invalid_request_error", "code": "bad_request", "message": reason}


def test_unauthenticated_asks_for_a_bearer_token() -> None:
    reply = check_response(Decision(Outcome.UNAUTHENTICATED, "missing bearer token"), "/p")
    assert headers_of(reply.denied_response.headers)["www-authenticate"].startswith("Bearer")


def test_token_limit_reply_has_retry_after_and_rate_limit_headers() -> None:
    decision = Decision(
        Outcome.TOKEN_LIMITED,
        identity=ALICE,
        tier=FREE,
        limit_kind="tokens",
        limit=100,
        remaining=0,
        reset_s=42,
        retry_after_s=42,
    )
    reply = check_response(decision, "/p")
    headers = headers_of(reply.denied_response.headers)
    assert headers["retry-after"] == "42"
    assert headers["x-ratelimit-limit"] == "100"
    assert headers["x-ratelimit-remaining"] == "0"
    assert headers["x-ratelimit-reset"] == "42"
    message = json.loads(reply.denied_response.body)["error"]["message"]
    assert "rate limit" in message
    assert "quota" in message


def test_allow_sets_identity_headers_strips_spoofed_and_fills_metadata() -> None:
    decision = Decision(
        Outcome.ALLOW,
        identity=ALICE,
        tier=FREE,
        model="m",
        charged=True,
        reserved_tokens=64,
        token_windows=(1234,),
        limit=100,
        remaining=36,
        reset_s=60,
        strip_headers=("x-maas-debug",),
    )
    reply = check_response(decision, "/ns/m/v1/chat/completions")
    ok = reply.ok_response
    assert headers_of(ok.headers) == {"x-maas-username": "alice", "x-maas-tier": "free"}
    assert list(ok.headers_to_remove) == ["x-maas-debug", "accept-encoding"]
    assert headers_of(ok.response_headers_to_add)["x-ratelimit-remaining"] == "36"
    meta = json_format.MessageToDict(reply.dynamic_metadata)
    assert meta["identity"] == {"userid": "alice", "tier": "free", "groups": ["tier-free-users"]}
    billing = handover.read({METADATA_NAMESPACE: reply.dynamic_metadata})
    assert billing is not None
    assert (billing.userid, billing.reserved, billing.windows) == ("alice", 64, (1234,))


def test_uncharged_allow_keeps_accept_encoding() -> None:
    decision = Decision(Outcome.ALLOW, identity=ALICE, tier=FREE, charged=False)
    reply = check_response(decision, "/v1/models")
    assert list(reply.ok_response.headers_to_remove) == []


def test_ext_proc_refusal_matches_the_ext_authz_one() -> None:
    from extproc.envoy.replies import immediate_response

    decision = Decision(
        Outcome.RATE_LIMITED, identity=ALICE, tier=FREE, limit_kind="requests", limit=5,
        remaining=0, reset_s=30, retry_after_s=30,
    )  # fmt: skip
    reply = immediate_response(decision).immediate_response
    assert reply.status.code == 429
    raw = {h.header.key: h.header.raw_value.decode() for h in reply.headers.set_headers}
    assert raw["retry-after"] == "30"
    assert json.loads(reply.body) == json.loads(check_response(decision, "/p").denied_response.body)


def test_ext_proc_request_mutation_sets_raw_values() -> None:
    from extproc.envoy.replies import request_mutation

    decision = Decision(
        Outcome.ALLOW, identity=ALICE, tier=FREE, charged=True, strip_headers=("x-maas-x",)
    )
    mutation = request_mutation(decision, body_length=42)
    raw = {h.header.key: h.header.raw_value for h in mutation.set_headers}
    assert raw == {"x-maas-username": b"alice", "x-maas-tier": b"free", "content-length": b"42"}
    assert list(mutation.remove_headers) == ["x-maas-x", "accept-encoding"]


@pytest.mark.parametrize("charged", [True, False])
def test_cached_allow_replies_equal_freshly_built_ones(charged: bool) -> None:
    from extproc.envoy.replies import CheckReplies

    cache = CheckReplies(max_entries=2)
    for remaining, windows, model in [(36, (1234,), "m"), (35, (), "other"), (0, (1, 2), "m")]:
        decision = Decision(
            Outcome.ALLOW, identity=ALICE, tier=FREE, model=model, charged=charged,
            reserved_tokens=remaining, token_windows=windows, limit=100, remaining=remaining,
            reset_s=60, strip_headers=("x-maas-debug",), inject_usage=charged, prompt_estimate=3,
        )  # fmt: skip
        for path in ("/a/b/v1/chat/completions", "/v1/models"):
            assert cache.reply(decision, path) == check_response(decision, path)


def test_anonymous_pass_sets_no_identity_and_no_metadata() -> None:
    from extproc.envoy.replies import CheckReplies, request_mutation

    decision = Decision(Outcome.ALLOW, "cors preflight", strip_headers=("x-maas-tier",))
    reply = CheckReplies().reply(decision, "/p")
    assert list(reply.ok_response.headers) == []
    assert list(reply.ok_response.headers_to_remove) == ["x-maas-tier"]
    assert not reply.dynamic_metadata.fields
    assert list(request_mutation(decision).set_headers) == []


def parse_http(raw: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = [(k, v) for k, _, v in (line.partition(": ") for line in lines)]
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize("outcome", [o for o in Outcome if o is not Outcome.ALLOW])
def test_http_refusals_equal_the_grpc_ones(outcome: Outcome) -> None:
    decision = Decision(outcome, "why", limit=10, remaining=0, retry_after_s=7, reset_s=7)
    grpc_reply = check_response(decision, "/p").denied_response
    status, headers, body = parse_http(http_reply(decision, "/p"))
    assert status == grpc_reply.status.code
    expected = [(h.header.key, h.header.value) for h in grpc_reply.headers]
    assert headers == [*expected, ("content-length", str(len(body)))]
    assert body.decode() == grpc_reply.body


def test_http_allow_matches_the_grpc_allow() -> None:
    decision = Decision(
        Outcome.ALLOW, identity=Identity("bob", "bob"), tier=Tier("premium", 1, frozenset()),
        model="m", charged=True, limit=100, remaining=60, reset_s=30, inject_usage=True,
        strip_headers=("x-maas-spoof",), request_id="r1", reserved_tokens=40,
    )  # fmt: skip
    ok = check_response(decision, "/p").ok_response
    status, headers, _ = parse_http(http_reply(decision, "/p"))
    assert status == 200
    got = dict(headers)
    for option in (*ok.headers, *ok.response_headers_to_add):
        assert got[option.header.key] == option.header.value
    assert got["x-envoy-auth-headers-to-remove"].split(",") == list(ok.headers_to_remove)


def test_a_value_that_would_split_the_reply_is_refused() -> None:
    with pytest.raises(ValueError, match="header value"):
        http_response(200, [("x-maas-username", "bob\r\nx-maas-tier: enterprise")])
