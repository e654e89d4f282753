"""MaaSSubscriptions, MaaSAuthPolicies and MaaSModelRefs kept current by list-then-watch.

As maas-api's informers (``maas-api/internal/config/cluster_config.go`` at c0639b1b): the
subscriptions and auth policies of one namespace (``subscriptions.namespace``), the model
references of every namespace. Each change rebuilds one ``View``; through API errors the last
good view stays in force. Until the first list answers, every selection is ``PlanUnavailable``.
"""

from __future__ import annotations

import logging

from extproc.authz.kube import Kube
from extproc.kuadrant.objects import Collection, ObjectWatch, Snapshot
from extproc.subscriptions import objects
from extproc.subscriptions.select import View

log = logging.getLogger("extproc.subscriptions")


def collections(namespace: str) -> list[Collection]:
    group, version = objects.GROUP, objects.VERSION
    return [
        Collection(group, version, objects.SUBSCRIPTIONS, namespace),
        Collection(group, version, objects.AUTH_POLICIES, namespace),
        Collection(group, version, objects.MODEL_REFS),
    ]


def view_of(snapshot: Snapshot) -> tuple[View, list[str]]:
    """The view of a snapshot, and one problem per subscription left out (no ``spec``)."""
    subscriptions: list[objects.Subscription] = []
    policies: list[objects.AuthPolicy] = []
    models: list[objects.ModelRef] = []
    problems: list[str] = []
    for (plural, namespace, name), obj in snapshot:
        if plural == objects.SUBSCRIPTIONS:
            if (sub := objects.subscription(obj)) is None:
                problems.append(f"MaaSSubscription {namespace}/{name} has no spec")
            else:
                subscriptions.append(sub)
        elif plural == objects.AUTH_POLICIES:
            if (policy := objects.auth_policy(obj)) is not None:
                policies.append(policy)
        elif plural == objects.MODEL_REFS:
            models.append(objects.model_ref(obj))
    return View(tuple(subscriptions), tuple(policies), tuple(models)), problems


class WatchedSubscriptions:
    """The current ``View`` (None until the first list of each collection has answered)."""

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        *,
        watch_timeout_s: int = 300,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        self._kube = kube
        self._view: View | None = None
        self._listed: set[str] = set()
        self._wanted = {objects.SUBSCRIPTIONS, objects.AUTH_POLICIES, objects.MODEL_REFS}
        self._problems: frozenset[str] = frozenset()
        self._closed = False
        self._watch = ObjectWatch(
            kube,
            collections(namespace),
            self._rebuild,
            watch_timeout_s=watch_timeout_s,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
            on_listed=self._listed.add,
        )

    def view(self) -> View | None:
        return self._view

    def _rebuild(self, snapshot: Snapshot) -> None:
        view, problems = view_of(snapshot)
        for problem in sorted(set(problems) - self._problems):
            log.warning("left out: %s", problem)
        self._problems = frozenset(problems)
        if not self._wanted <= self._listed:
            return  # a view without one of the kinds would refuse what it should not
        if view != self._view:
            self._view = view
            log.info(
                "maas objects loaded: subscriptions=%d authpolicies=%d modelrefs=%d",
                len(view.subscriptions),
                len(view.policies),
                len(view.models),
            )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._watch.close()
        await self._kube.release()
