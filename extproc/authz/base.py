"""The seams admission depends on: where identities, plans (tiers, subscriptions) and access come from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from extproc.domain import Identity, Outcome, Plan, Tier


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


@dataclass(frozen=True, slots=True)
class PlanQuery:
    """What the plan step knows of a request."""

    identity: Identity
    model: str = ""  # "<namespace>/<name>" of a path route, else the body's model ("" none)
    requested: str = ""  # the subscription the client asked for (X-MaaS-Subscription)
    charged: bool = False  # the route is metered (limited and billed)


@dataclass(frozen=True, slots=True)
class PlanRefusal:
    """Why no plan applies: the outcome, the message and (subscriptions) MaaS's error code."""

    outcome: Outcome
    reason: str
    code: str = ""


class PlanSource(Protocol):
    async def plan_for(self, query: PlanQuery) -> Plan | PlanRefusal | None:
        """The caller's plan, the refusal, or None when the request needs none (it names no
        model, in the subscription era). Raises an ``Unavailable`` on outages."""
        ...

    async def close(self) -> None: ...


class TierPlans:
    """The tier era's plan step: the caller's tier, else 403 ``no_tier``."""

    def __init__(self, tiers: TierSource) -> None:
        self._tiers = tiers

    async def plan_for(self, query: PlanQuery) -> Plan | PlanRefusal | None:
        tier = await self._tiers.tier_for(query.identity)
        if tier is None:
            return PlanRefusal(Outcome.NO_TIER, "no tier matches the caller's groups")
        return tier

    async def close(self) -> None:
        await self._tiers.close()


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
