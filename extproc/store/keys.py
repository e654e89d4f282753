"""Builds every counter-store key; each is hash-tagged ``{userid}`` so one user's keys share a slot."""

from __future__ import annotations

import re

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


def subscription_tokens_key(
    userid: str, subscription: str, model: str, index: int, window_s: int
) -> str:
    """Subscription era: one counter per token rate of (subscription, model), as Kuadrant keeps
    one per limit of the model's policy; the rate's place and window keep two rates apart."""
    return f"{PREFIX}:{_tag(userid)}:stok:{subscription}:m:{model}:{index}:{window_s}"


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


def ledger_field(model: str, kind: str, attribution: tuple[str, ...] = ()) -> str:
    """``<model>|<kind>``; with an attribution (subscription era: subscription, key name,
    organization id, cost center) ``<model>|<part>|…|<kind>+``, each part with ``%`` and ``|``
    escaped. No tier-era kind ends with ``+``, so the two forms never meet in one hash."""
    if not attribution:
        return f"{model}|{kind}"
    parts = (model, *attribution)
    return "|".join(p.replace("%", "%25").replace("|", "%7C") for p in parts) + f"|{kind}+"


def ledger_field_parts(field: str) -> tuple[str, str, tuple[str, ...]]:
    """``ledger_field`` read back: (model, kind, attribution)."""
    head, _, kind = field.rpartition("|")
    if not kind.endswith("+"):
        return head, kind, ()
    model, *attribution = (_UNESCAPE.sub(_unescaped, p) for p in head.split("|"))
    return model, kind[:-1], tuple(attribution)


_UNESCAPE = re.compile("%(25|7C)")


def _unescaped(match: re.Match[str]) -> str:
    return "%" if match[1] == "25" else "|"


LEDGER_KINDS = ("prompt", "completion", "total", "estimated", "requests")
