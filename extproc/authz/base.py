"""The seams admission depends on: where identities, tiers and model access come from."""

from __future__ import annotations

from typing import Protocol

from extproc.domain import Identity, Tier


class IdentitySource(Protocol):
    async def authenticate(self, token: str) -> Identity | None:
        """The caller, or None for an invalid token; raises IdentityUnavailable on outages."""
        ...

    async def close(self) -> None: ...


class TierSource(Protocol):
    async def tier_for(self, identity: Identity) -> Tier | None:
        """The caller's tier, or None when no tier matches; raises TierUnavailable on outages."""
        ...

    async def close(self) -> None: ...


class AccessChecker(Protocol):
    async def allowed(self, identity: Identity, namespace: str, name: str) -> bool:
        """May the caller post to this model? Raises AccessUnavailable on outages."""
        ...

    async def close(self) -> None: ...


class AllowAll:
    """Model access is not checked (``access.check: none``)."""

    async def allowed(self, identity: Identity, namespace: str, name: str) -> bool:
        return True

    async def close(self) -> None:
        return None
