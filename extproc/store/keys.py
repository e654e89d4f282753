"""Builds every counter-store key; each is hash-tagged ``{userid}`` so one user's keys share a slot.

Every variable part is escaped injectively, so no two users (tiers, models) ever share a key:
``{``, ``}``, ``%``, ``:`` and non-printable characters become ``%XX`` (their UTF-8 bytes),
everything else stays as it is. Without braces in it, the user's part is the whole hash tag, and
Redis Cluster puts all of one user's keys in one slot: the slot hashes the text between the
first ``{`` and the next ``}``, unless it is empty (redis/docs,
content/operate/oss_and_stack/reference/cluster-spec.md, "Hash tags", commit
025c5387ea8d65308631b2fbcca8b05f588fe0b9). So an empty value is escaped as ``%``: every other
``%`` of an escaped value is followed by two hex digits, nothing else escapes to it.
"""

from __future__ import annotations

import binascii
import functools
import re

PREFIX = "maas"
_ESCAPED = re.compile(r"[{}%:\x00-\x20\x7f-\x9f\u2028\u2029]")


def _percent(match: re.Match[str]) -> str:
    return "".join(f"%{byte:02X}" for byte in match.group().encode())


def escape(value: str) -> str:
    """``value`` with ``{ } % :`` and non-printables as ``%XX``; injective, and a no-op for
    ordinary names (``bob``, ``premium``, ``facebook/opt-125m``)."""
    return _ESCAPED.sub(_percent, value) if value else "%"


@functools.lru_cache(maxsize=4096)
def _tag(userid: str) -> str:
    """Cached: every request builds several keys of its user's (the escape is a regex pass)."""
    return "{" + escape(userid) + "}"


def requests_key(userid: str, tier: str, model: str = "", *, route: str = "") -> str:
    suffix = f":m:{escape(model)}" if model else ""
    return f"{PREFIX}:{_tag(userid)}:req:{escape(tier)}{suffix}{_route(route)}"


def tokens_key(userid: str, tier: str, model: str = "", *, route: str = "") -> str:
    suffix = f":m:{escape(model)}" if model else ""
    return f"{PREFIX}:{_tag(userid)}:tok:{escape(tier)}{suffix}{_route(route)}"


def subscription_tokens_key(
    userid: str, subscription: str, model: str, index: int, window_s: int
) -> str:
    """Subscription era: one counter per token rate of (subscription, model), as Kuadrant keeps
    one per limit of the model's policy; the rate's place and window keep two rates apart."""
    return (
        f"{PREFIX}:{_tag(userid)}:stok:{escape(subscription)}:m:{escape(model)}:{index}:{window_s}"
    )


def _route(route: str) -> str:
    """``limits.scope: route``: the HTTPRoute (``<namespace>/<name>``) the counter belongs to."""
    return f":r:{escape(route)}" if route else ""


# A budget shared by many users has its own hash tag: the scope's letter, a colon, the subject.
# An escaped value never holds a raw ':', so no shared tag is ever a user's tag.
_SHARED_TAGS = {"group": "g", "subscription": "s", "organization": "o", "model": "m"}


def budget_key(name: str, scope: str, subject: str) -> str:
    """The counter of budget ``name`` for ``subject``: a user's under the user's own tag (the
    same Redis Cluster slot as the user's windows), a shared one under the subject's tag."""
    shared = "{" + _SHARED_TAGS.get(scope, "") + ":" + escape(subject) + "}"
    return f"{PREFIX}:{_tag(subject) if scope == 'user' else shared}:bud:{escape(name)}"


def period_key(key: str, label: str) -> str:
    """The counter of one calendar period (``d20261201``, ``w20261130``, ``m202612``)."""
    return f"{key}:{label}"


def alert_key(counter_key: str, threshold: int) -> str:
    """Claimed once per (budget, subject, period, threshold) before a soft-limit event goes out."""
    return f"{counter_key}:soft:{threshold}"


def hash_tag(key: str) -> str:
    """The part of a key Redis Cluster hashes: between the first ``{`` and the next ``}``."""
    start = key.find("{")
    end = key.find("}", start + 1)
    if start < 0 or end <= start + 1:
        return key
    return key[start + 1 : end]


def tagged_request_key(tag: str, request_id: str) -> str:
    """``request_key`` in the slot of ``tag`` (a shared budget's), for its own once-only state."""
    return f"{PREFIX}:{{{tag}}}:rq:{escape(request_id)}"


def sliding_bucket_key(key: str, bucket: int) -> str:
    """The key of one aligned sub-window of a sliding counter."""
    return f"{key}:w{bucket}"


def ledger_key(userid: str, day: str) -> str:
    return f"{PREFIX}:{_tag(userid)}:usage:{day}"


def request_key(userid: str, request_id: str) -> str:
    """One admitted request's state, ``held`` then ``settled`` (user-tagged; see the Lua scripts).

    A settle whose id is already ``settled`` is a replay and is ignored; an admission that runs
    after its own settle is void.
    """
    return f"{PREFIX}:{_tag(userid)}:rq:{escape(request_id)}"  # tagged_request_key's form


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


def ledger_total_field(kind: str) -> str:
    """The ledger hash's total of ``kind`` over every model and attribution: the kind alone.
    Every ``ledger_field`` holds a ``|``, so the two never meet."""
    return kind


def is_ledger_total(field: str) -> bool:
    return "|" not in field


def ledger_totals_since_key() -> str:
    """The first day (YYYYMMDD) whose ledger hashes all carry their totals: set once by the first
    sidecar that writes them, to the day after it started (earlier hashes may lack them)."""
    return f"{PREFIX}:usage-totals-since"


# Every (user, day) hash of a listing repeats the same few fields: worth remembering them.
@functools.lru_cache(maxsize=4096)
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


LEDGER_KINDS = (
    "prompt",
    "completion",
    "total",
    "estimated",
    "requests",
    # Issue #16: the informational token kinds, the cost (micro-units), and how many requests
    # reported each kind (``_n``) or were priced, so "not reported" stays apart from 0.
    "cached",
    "cache_creation",
    "reasoning",
    "cost",
    "cached_n",
    "cache_creation_n",
    "reasoning_n",
    "priced",
)


CLUSTER_SLOTS = 16384
EXPORT_STREAMS_KEY = f"{PREFIX}:export:streams"  # Cluster: the set of every slot's stream key


def slot_of(userid: str) -> int:
    """The Redis Cluster slot of every key of ``userid``: CRC16 (XMODEM) of the hash tag, mod
    16384 (cluster-spec.md, "Hash tags", as cited above); ``binascii.crc_hqx`` is that CRC."""
    return binascii.crc_hqx(escape(userid).encode(), 0) % CLUSTER_SLOTS


_TAG_CHARS = 5  # slot tags are five of "@A…O" (0x40-0x4F): their low nibbles, 20 free bits
_TAG_BASE = b"@" * _TAG_CHARS


def _crc(data: bytes) -> int:
    return binascii.crc_hqx(data, 0)


def _tag_of(nibbles: int) -> bytes:
    return bytes(0x40 | (nibbles >> (4 * j)) & 0xF for j in range(_TAG_CHARS))


@functools.cache
def _tag_solver() -> tuple[tuple[int, int], ...]:
    """Row-reduced (pivot bit, row) pairs of the GF(2) map nibbles -> CRC16 of the tag
    (a row: the CRC bits << 20 | the nibble bits giving them).

    The CRC has no final XOR, so for tags of one length it is affine: the CRC of a tag is the
    base's CRC XOR a linear function of the 20 nibble bits. That function is solved once here
    (20 CRCs), so the tag of any slot takes a few XORs instead of a search. Four characters
    would not do: their 16 bits do not reach every CRC."""
    base = _crc(_TAG_BASE)
    rows = [((_crc(_tag_of(1 << i)) ^ base) << 20) | (1 << i) for i in range(4 * _TAG_CHARS)]
    reduced: list[tuple[int, int]] = []
    for bit in range(35, 19, -1):
        pivot = next((r for r in rows if r >> bit & 1), None)
        if pivot is None:
            raise AssertionError("slot tags: the CRC map is not invertible")  # pragma: no cover
        rows.remove(pivot)
        rows = [r ^ pivot if r >> bit & 1 else r for r in rows]
        reduced = [(b, r ^ pivot if r >> bit & 1 else r) for b, r in reduced]
        reduced.append((bit, pivot))
    return tuple(reduced)


@functools.lru_cache(maxsize=CLUSTER_SLOTS)
def slot_tag(slot: int) -> str:
    """A five-character hash tag whose keys land on ``slot``."""
    want = (_crc(_TAG_BASE) ^ slot) << 20  # the two top CRC bits 0: CRC == slot exactly
    nibbles = 0
    for bit, row in _tag_solver():
        if want >> bit & 1:
            nibbles ^= row & 0xFFFFF
    return _tag_of(nibbles).decode()


def export_stream_key(base: str, userid: str = "", *, cluster: bool = False) -> str:
    """The stream a charge record of ``userid`` goes to.

    Standalone: ``base`` itself, one stream for every user. Cluster: a script may only touch
    keys of one slot, so the record goes to ``base:{<tag>}``, the stream of the user's own
    slot, whose tag is chosen to hash to that slot: at most 16384 streams, one per slot in use.
    """
    if not cluster:
        return base
    return f"{base}:{{{slot_tag(slot_of(userid))}}}"
