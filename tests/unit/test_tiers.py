"""Tier mapping parsing and resolution per CONTRACTS §4."""

from __future__ import annotations

import pytest

from extproc.authz.tiers import TierMapping, parse_mapping_text
from extproc.errors import ConfigError
from tests.helpers import LOCAL

MAPPING = TierMapping(parse_mapping_text((LOCAL / "tiers.yaml").read_text(), "tiers.yaml"), "gw")


@pytest.mark.parametrize(
    ("groups", "tier"),
    [
        (["system:authenticated"], "free"),
        (["system:authenticated", "premium-group"], "premium"),
        (["tier-free-users", "premium-group", "admin-group"], "enterprise"),
        (["system:serviceaccounts:gw-tier-premium"], "premium"),
        (["system:serviceaccounts:maas-default-gateway-tier-premium"], None),  # other instance
        (["contractors"], None),
        ([], None),
    ],
)
def test_highest_level_wins(groups: list[str], tier: str | None) -> None:
    resolved = MAPPING.resolve(groups)
    assert (resolved.name if resolved else None) == tier


def test_ties_keep_configmap_order() -> None:
    text = """
- {name: first, level: 1, groups: [shared]}
- {name: second, level: 1, groups: [shared]}
- {name: low, level: 0, groups: [shared]}
"""
    mapping = TierMapping(parse_mapping_text(text, "inline"), "gw")
    resolved = mapping.resolve(["shared"])
    assert resolved is not None
    assert resolved.name == "first"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("- {level: 1, groups: []}", "[0].name"),
        ("- {name: x, level: high}", "[0].level"),
        ("- {name: x, groups: a-string}", "[0].groups"),
        ("[]", "non-empty"),
        ("tiers: [", "valid YAML"),
    ],
)
def test_bad_mappings_name_the_entry(text: str, where: str) -> None:
    with pytest.raises(ConfigError, match=where.replace("[", r"\[").replace("]", r"\]")):
        parse_mapping_text(text, "inline")


def test_accepts_configmap_manifest_or_plain_list() -> None:
    from_manifest = parse_mapping_text((LOCAL / "tiers.yaml").read_text(), "a")
    plain = parse_mapping_text("- {name: free, level: 0, groups: [g]}", "b")
    assert [t.name for t in from_manifest] == ["free", "premium", "enterprise"]
    assert from_manifest[0].display_name == "Free Tier"
    assert [t.name for t in plain] == ["free"]
