"""Ledger fields: the tier era's ``<model>|<kind>`` unchanged, the subscription era's booked to a
subscription, key and tokenMetadata; every field read back as written, the two forms never mixed."""

from __future__ import annotations

import pytest

from extproc.store import keys, ledger
from extproc.store.base import Attribution

NAMES = ["", "m", "a|b", "%7C", "%25|%", "|", "x+", "ns/m|total", "a|total+", "ü|💥"]


@pytest.mark.parametrize("model", NAMES)
@pytest.mark.parametrize("part", NAMES)
def test_every_field_reads_back_as_written(model: str, part: str) -> None:
    for kind in keys.LEDGER_KINDS:
        assert keys.ledger_field_parts(keys.ledger_field(model, kind)) == (model, kind, ())
        booked = ("ns/sub", part, "org", part)
        field = keys.ledger_field(model, kind, booked)
        assert keys.ledger_field_parts(field) == (model, kind, booked)


def test_the_tier_era_field_is_unchanged() -> None:
    assert keys.ledger_field("facebook/opt-125m", "total") == "facebook/opt-125m|total"


def test_rows_keep_the_two_eras_apart() -> None:
    booked = Attribution("ns/sub", "key|1", "org", "cc")
    tier_model = "ns/sub|key%7C1|org|cc"  # a tier-era model that looks like the other form
    fields = {
        keys.ledger_field(tier_model, "total"): 5,
        keys.ledger_field("m", "total", booked.parts()): 7,
        keys.ledger_field("m", "requests", booked.parts()): 1,
    }
    rows = ledger.rows("20260821", fields)
    assert [(r.model, r.total_tokens, r.attribution) for r in rows] == [
        ("m", 7, booked),
        (tier_model, 5, Attribution()),
    ]
