"""Builds every counter-store key; each is hash-tagged ``{userid}`` so one user's keys share a slot."""

from __future__ import annotations

PREFIX = "maas"


def _tag(userid: str) -> str:
    # Braces would end the hash tag early; Kubernetes names never contain them, API-key users might.
    return "{" + userid.replace("{", "(").replace("}", ")") + "}"


def requests_key(userid: str, tier: str, model: str = "", *, route: str = "") -> str:
    suffix = f":m:{model}" if model else ""
    return f"{PREFIX}:{_tag(userid)}:req:{tier}{suffix}{_route(route)}"


def tokens_key(userid: str, tier: str, model: str = "", *, route: str = "") -> str:
    suffix = f":m:{model}" if model else ""
    return f"{PREFIX}:{_tag(userid)}:tok:{tier}{suffix}{_route(route)}"


def _route(route: str) -> str:
    """``limits.scope: route``: the HTTPRoute (``<namespace>/<name>``) the counter belongs to."""
    return f":r:{route}" if route else ""


def sliding_bucket_key(key: str, bucket: int) -> str:
    """The key of one aligned sub-window of a sliding counter."""
    return f"{key}:w{bucket}"


def ledger_key(userid: str, day: str) -> str:
    return f"{PREFIX}:{_tag(userid)}:usage:{day}"


def settled_key(userid: str, request_id: str) -> str:
    """Marks one admission's settle as applied, so a replay of it is ignored (user-tagged)."""
    return f"{PREFIX}:{_tag(userid)}:settled:{request_id}"


def ledger_users_key(day: str) -> str:
    """The set of users with usage on ``day`` (not user-tagged: one small set per day)."""
    return f"{PREFIX}:users:{day}"


def ledger_field(model: str, kind: str) -> str:
    return f"{model}|{kind}"


LEDGER_KINDS = ("prompt", "completion", "total", "estimated", "requests")
