"""Which MaaSSubscription a request runs under, decided as maas-api and MaaS's gateway policy decide.

Reproduces opendatahub-io/models-as-a-service at c0639b1b:

- ``maas-api/internal/subscription/selector.go`` ``Select``: the requested subscription (the
  ``X-MaaS-Subscription`` header, or the one an API key is bound to) by ``namespace/name``, else
  by bare name; without one, the single subscription the caller owns that contains the model,
  else ``multiple_subscriptions``; ordered by priority, then largest limit, then name; body-model
  aliases resolved through ``MaaSModelRef.status.resolvedModelAlias``; only phases Active and
  Degraded (a Degraded one only while the model's rate limit policy is ready). Error codes and
  messages are those of ``handler.go`` ``SelectSubscription``.
- ``maas-api/internal/authpolicy/checker.go``: ``accessAllowed`` from the MaaSAuthPolicies.
- ``maas-controller/pkg/controller/maas/maasauthpolicy_controller.go``: the gateway AuthPolicy's
  ``subscription-valid`` and ``require-group-membership`` rules, which refuse a selection that is
  being deleted or whose model the caller may not use with 403 ``unauthorized`` "Access denied".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from extproc.subscriptions.objects import AuthPolicy, ModelRef, Subscription, SubscriptionModel

PHASES = ("Active", "Degraded")


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused selection: maas-api's error code (the 403's ``x-ext-auth-reason``) and message."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Selected:
    subscription: Subscription
    model: SubscriptionModel  # the subscription's entry for the requested model


# What the gateway policy answers when the selection passes maas-api but not its own rules.
ACCESS_DENIED = Refusal("unauthorized", "Access denied")


@dataclass(frozen=True)
class View:
    """One consistent view of the three kinds of objects (the watched ones, or fixtures)."""

    subscriptions: tuple[Subscription, ...] = ()
    policies: tuple[AuthPolicy, ...] = ()
    models: tuple[ModelRef, ...] = ()
    _by_ref: dict[str, ModelRef] = field(init=False, repr=False, compare=False)
    _by_alias: dict[str, ModelRef] = field(init=False, repr=False, compare=False)
    _ordered: tuple[Subscription, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_alias: dict[str, ModelRef] = {}
        for model in self.models:
            if model.alias:
                by_alias.setdefault(model.alias, model)  # the first one, as maas-api's loop
        object.__setattr__(self, "_by_ref", {m.ref: m for m in self.models})
        object.__setattr__(self, "_by_alias", by_alias)
        # priority desc, then the largest limit desc, then name (sortSubscriptionsByPriority).
        ordered = sorted(self.subscriptions, key=lambda s: (-s.priority, -s.max_limit, s.name))
        object.__setattr__(self, "_ordered", tuple(ordered))

    def model_ref(self, ref: str) -> ModelRef | None:
        """The MaaSModelRef ``<namespace>/<name>``."""
        return self._by_ref.get(ref)

    def resolve(self, model: str) -> str:
        """A body-routing alias as its MaaSModelRef ``<namespace>/<name>``; else unchanged."""
        found = self._by_alias.get(model) if model else None
        return found.ref if found is not None else model

    def alias_of(self, entry: SubscriptionModel) -> str:
        found = self._by_ref.get(entry.ref)
        return found.alias if found is not None else ""

    def select(
        self, groups: Sequence[str], username: str, requested: str, model: str
    ) -> Selected | Refusal:
        """The subscription and model entry for a request, or the 403 it gets."""
        if not groups and not username:
            return Refusal(
                "internal_error",
                "failed to select subscription: either groups or username must be provided",
            )
        model = self.resolve(model)
        if not self._ordered:
            return Refusal("not_found", "no matching subscription found for user")
        if requested:
            chosen = self._requested(requested)
            if chosen is None:
                return Refusal("not_found", "requested subscription not found")
            if not owns(chosen, username, groups):
                return Refusal("access_denied", "access denied to requested subscription")
            if model and self.entry(chosen, model) is None:
                return Refusal(
                    "model_not_in_subscription",
                    f"subscription {requested} does not include model {model}",
                )
        else:
            mine = [
                s
                for s in self._ordered
                if owns(s, username, groups) and (not model or self.entry(s, model) is not None)
            ]
            if not mine:
                return Refusal("not_found", "no matching subscription found for user")
            if len(mine) > 1:
                return Refusal(
                    "multiple_subscriptions",
                    "user has access to multiple subscriptions, must specify subscription "
                    "using X-MaaS-Subscription header",
                )
            chosen = mine[0]
        unhealthy = self._unhealthy(chosen, model)
        if unhealthy is not None:
            return unhealthy
        entry = self.entry(chosen, model)
        # The gateway's own rules: not being deleted, and the caller may use this model.
        if entry is None or chosen.deleting or not self.allowed(groups, username, entry):
            return ACCESS_DENIED
        return Selected(chosen, entry)

    def _requested(self, requested: str) -> Subscription | None:
        for sub in self._ordered:
            if sub.qualified == requested:
                return sub
        if "/" in requested:
            return None
        return next((s for s in self._ordered if s.name == requested), None)

    def entry(self, sub: Subscription, model: str) -> SubscriptionModel | None:
        """``findModelRef``: by ``namespace/name``, else by alias or bare name."""
        namespace, slash, name = model.partition("/")
        if slash:
            for entry in sub.models:
                if (entry.namespace, entry.name) == (namespace, name):
                    return entry
        for entry in sub.models:
            alias = self.alias_of(entry)
            if (alias and alias == model) or entry.name == model:
                return entry
        return None

    def _unhealthy(self, sub: Subscription, model: str) -> Refusal | None:
        """``checkModelHealth`` for an inference request (a model is named)."""
        if sub.phase not in PHASES:
            shown = sub.phase or "unreconciled"
            return Refusal(
                "model_unhealthy", f"subscription is in {shown} phase (allowed: Active, Degraded)"
            )
        if sub.phase == "Active":
            return None
        entry = self.entry(sub, model)
        if entry is None:
            return Refusal(
                "model_unhealthy", "requested model does not match any model in the subscription"
            )
        if not entry.rates:
            return None
        status = next((s for s in sub.rate_limit_statuses if s.model == entry.name), None)
        if status is None or not status.ready:
            return Refusal("model_unhealthy", "subscription rate limiting policies are not ready")
        return None

    def allowed(self, groups: Iterable[str], username: str, entry: SubscriptionModel) -> bool:
        """A MaaSAuthPolicy names the caller (user or group) and this model."""
        held = {g.strip() for g in groups}
        key = (entry.namespace, entry.name)
        return any(
            key in policy.models
            and (
                (username and username.strip() in policy.users)
                or not held.isdisjoint(policy.groups)
            )
            for policy in self.policies
        )


def owns(sub: Subscription, username: str, groups: Iterable[str]) -> bool:
    """``userHasAccess``: the caller is an owner, by name or by group."""
    return username in sub.users or not {g.strip() for g in groups}.isdisjoint(sub.groups)
