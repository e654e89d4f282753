"""Identity from a static API-keys file mapping sha256(token) to a user and groups (local runs)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml

from extproc.domain import Identity
from extproc.errors import ConfigError


def token_hash(token: str) -> str:
    """The only form in which a token is ever kept: its sha256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


class ApiKeyIdentities:
    """``authenticate`` looks the token's hash up in a table read once from a YAML file.

    File shape: ``keys: [{sha256: <hex>, user: <userid>, groups: [..]}]``.
    """

    def __init__(self, table: dict[str, Identity]) -> None:
        self._table = table

    @classmethod
    def from_file(cls, path: Path) -> ApiKeyIdentities:
        try:
            raw: Any = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(str(path), f"a readable YAML api-keys file ({exc})") from exc
        entries = raw.get("keys") if isinstance(raw, dict) else None
        if not isinstance(entries, list):
            raise ConfigError(f"{path}: keys", "a list of {sha256, user, groups}")
        table: dict[str, Identity] = {}
        for index, entry in enumerate(entries):
            where = f"{path}: keys[{index}]"
            if not isinstance(entry, dict):
                raise ConfigError(where, "a mapping {sha256, user, groups}", entry)
            digest, user, groups = entry.get("sha256"), entry.get("user"), entry.get("groups", [])
            if not isinstance(digest, str) or len(digest) != 64:
                raise ConfigError(f"{where}.sha256", "64 hex characters (sha256 of the token)")
            if not isinstance(user, str) or not user:
                raise ConfigError(f"{where}.user", "a non-empty user id", user)
            if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
                raise ConfigError(f"{where}.groups", "a list of group names", groups)
            table[digest.lower()] = Identity(userid=user, username=user, groups=tuple(groups))
        return cls(table)

    async def authenticate(self, token: str) -> Identity | None:
        return self._table.get(token_hash(token))

    async def close(self) -> None:
        return None
