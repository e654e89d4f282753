"""Tier mapping (the ``tier-to-group-mapping`` format) and resolution of a user's groups to a tier."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from extproc.domain import Identity, Tier
from extproc.errors import ConfigError


def parse_tiers(raw: Any, where: str) -> list[Tier]:
    """Validate a YAML list of ``{name, displayName?, description?, level, groups}``."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(where, "a non-empty list of tiers {name, level, groups}", raw)
    tiers: list[Tier] = []
    for index, entry in enumerate(raw):
        at = f"{where}[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(at, "a mapping {name, level, groups}", entry)
        name, level, groups = entry.get("name"), entry.get("level", 0), entry.get("groups", [])
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{at}.name", "a non-empty tier name", name)
        if isinstance(level, bool) or not isinstance(level, int):
            raise ConfigError(f"{at}.level", "a whole number", level)
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise ConfigError(f"{at}.groups", "a list of group names", groups)
        display = entry.get("displayName", "")
        tiers.append(Tier(name, level, frozenset(groups), str(display or "")))
    return tiers


def parse_mapping_text(text: str, where: str) -> list[Tier]:
    """Tiers from YAML text: the ConfigMap's ``tiers`` value, or a whole ConfigMap manifest."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(where, f"valid YAML ({exc})") from exc
    if isinstance(raw, dict) and isinstance(raw.get("data"), dict):
        return parse_mapping_text(str(raw["data"].get("tiers", "")), f"{where}: data.tiers")
    if isinstance(raw, dict) and "tiers" in raw:
        tiers = raw["tiers"]
        if isinstance(tiers, str):
            return parse_mapping_text(tiers, f"{where}: tiers")
        return parse_tiers(tiers, f"{where}: tiers")
    return parse_tiers(raw, where)


class TierMapping:
    """Resolution per CONTRACTS §4: projected SA groups added, highest level first, ties in order."""

    def __init__(self, tiers: Sequence[Tier], instance: str) -> None:
        ordered = sorted(enumerate(tiers), key=lambda pair: (-pair[1].level, pair[0]))
        self.tiers = tuple(
            Tier(
                t.name,
                t.level,
                t.groups | {f"system:serviceaccounts:{instance}-tier-{t.name}"},
                t.display_name,
            )
            for _, t in ordered
        )

    def resolve(self, groups: Iterable[str]) -> Tier | None:
        held = set(groups)
        for tier in self.tiers:
            if not tier.groups.isdisjoint(held):
                return tier
        return None


class FileTiers:
    """Tiers from a static file, read once."""

    def __init__(self, mapping: TierMapping) -> None:
        self.mapping = mapping

    @classmethod
    def from_file(cls, path: Path, instance: str) -> FileTiers:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
            raise ConfigError(str(path), "a readable tier mapping file", reason) from exc
        return cls(TierMapping(parse_mapping_text(text, str(path)), instance))

    async def tier_for(self, identity: Identity) -> Tier | None:
        return self.mapping.resolve(identity.groups)

    async def close(self) -> None:
        return None
