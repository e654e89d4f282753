"""Tiers from the ``tier-to-group-mapping`` ConfigMap, watched so edits apply without a restart."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from kubernetes import watch

from extproc.authz.kube import CONNECT_TIMEOUT_S, Kube, run_list_watch, stop_watches
from extproc.authz.tiers import TierMapping, parse_mapping_text
from extproc.config import TiersConfig
from extproc.domain import Identity, Tier
from extproc.errors import ConfigError, TierUnavailable
from extproc.observability.metrics import Metrics

log = logging.getLogger("extproc.tiers")

TIERS_KEY = "tiers"


class ConfigMapTiers:
    """Resolves tiers from the last good mapping; a watch thread keeps that mapping current.

    The thread lists the ConfigMap (by ``metadata.name`` field selector), then watches from the
    list's resourceVersion; on 410 Gone it lists again, on other errors it lists again after a
    backoff. An invalid update (bad YAML, wrong shape, key missing, ConfigMap deleted) is logged
    in one line, counted in ``maas_tier_mapping_rejected_total`` and ignored: the last good
    mapping stays. Until a first valid mapping is read, ``tier_for`` raises ``TierUnavailable``.
    """

    def __init__(
        self,
        kube: Kube,
        settings: TiersConfig,
        metrics: Metrics,
        *,
        watch_timeout_s: int = 300,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        first_load_wait_s: float = 5.0,
    ) -> None:
        self._kube = kube
        self._namespace = settings.configmap_namespace
        self._name = settings.configmap_name
        self._selector = f"metadata.name={settings.configmap_name}"
        self._instance = settings.instance
        self._metrics = metrics
        self._watch_timeout_s = watch_timeout_s
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._first_load_wait_s = first_load_wait_s
        self._mapping: TierMapping | None = None
        self._version = ""  # resourceVersion of the mapping in use
        self._attempted = threading.Event()  # the first list has succeeded or failed
        self._first_list: asyncio.Future[bool] | None = None
        self._stop = threading.Event()
        self._closed = False
        self._watch = watch.Watch()
        self._thread = threading.Thread(
            target=self._run, name=f"watch-configmap-{self._name}", daemon=True
        )
        self._thread.start()

    @property
    def mapping(self) -> TierMapping | None:
        return self._mapping

    @property
    def version(self) -> str:
        """The resourceVersion of the ConfigMap the mapping in use came from ("" before any)."""
        return self._version

    async def tier_for(self, identity: Identity) -> Tier | None:
        mapping = self._mapping
        if mapping is None:
            mapping = await self._first_mapping()
        return mapping.resolve(identity.groups)

    async def _first_mapping(self) -> TierMapping:
        if not self._attempted.is_set():
            # Only while starting: every waiter shares one thread blocked on the first list.
            if self._first_list is None:
                self._first_list = asyncio.ensure_future(
                    asyncio.to_thread(self._attempted.wait, self._first_load_wait_s)
                )
            await asyncio.shield(self._first_list)
        mapping = self._mapping
        if mapping is None:
            self._metrics.unavailable.labels("tiers").inc()
            raise TierUnavailable(
                f"no valid tier mapping read from ConfigMap {self._namespace}/{self._name}"
            )
        return mapping

    # ------------------------------------------------------------------ the watch thread

    def _run(self) -> None:
        run_list_watch(
            self._kube,
            self._stop,
            "tier mapping ConfigMap",
            self._list,
            self._follow,
            backoff_s=self._backoff_s,
            max_backoff_s=self._max_backoff_s,
            listed=self._attempted.set,
        )

    def _list(self) -> str | None:
        listed = self._kube.core.list_namespaced_config_map(
            self._namespace, field_selector=self._selector, _request_timeout=self._kube.timeout
        )
        self._kube.note_success()
        items = listed.items or []
        if items:
            self._apply(items[0].data, str(items[0].metadata.resource_version or ""))
        elif self._mapping is None:
            log.warning("tier mapping ConfigMap %s/%s not found", self._namespace, self._name)
        else:
            self._reject("", "the ConfigMap is gone")
        return listed.metadata.resource_version or None

    def _follow(self, version: str | None) -> str | None:
        """Apply watch events until the server ends the watch; the last resourceVersion seen."""
        events = self._watch.stream(
            self._kube.core.list_namespaced_config_map,
            self._namespace,
            field_selector=self._selector,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=self._watch_timeout_s,
            _request_timeout=(CONNECT_TIMEOUT_S, self._watch_timeout_s + 30),
        )
        try:
            for event in events:
                if self._stop.is_set():
                    break
                raw: dict[str, Any] = event.get("raw_object") or {}
                seen = str((raw.get("metadata") or {}).get("resourceVersion") or "")
                kind = event.get("type")
                if kind in ("ADDED", "MODIFIED"):
                    self._apply(raw.get("data"), seen)
                elif kind == "DELETED":
                    self._reject(seen, "the ConfigMap was deleted")
                version = seen or version
        finally:
            events.close()  # closes the response now, not when the generator is collected
        return version

    def _apply(self, data: Any, version: str) -> None:
        text = data.get(TIERS_KEY) if isinstance(data, dict) else None
        if not isinstance(text, str) or not text.strip():
            self._reject(version, f"no '{TIERS_KEY}' key in data")
            return
        where = f"ConfigMap {self._namespace}/{self._name} data.{TIERS_KEY}"
        try:
            mapping = TierMapping(parse_mapping_text(text, where), self._instance)
        except ConfigError as exc:
            self._reject(version, str(exc))
            return
        changed = self._mapping is None or self._mapping.tiers != mapping.tiers
        self._mapping = mapping
        self._version = version
        if changed:
            log.info(
                "tier mapping loaded: version=%s tiers=%s",
                version,
                ",".join(f"{t.name}:{t.level}" for t in mapping.tiers),
            )

    def _reject(self, version: str, reason: str) -> None:
        self._metrics.tier_mapping_rejected.inc()
        kept = f"version {self._version}" if self._mapping is not None else "no mapping"
        log.warning(
            "tier mapping update rejected: version=%s keeping=%s reason=%s",
            version,
            kept,
            " ".join(reason.split()),
        )

    async def close(self) -> None:
        """Stop the watch thread (idempotent), then release the client."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        await asyncio.to_thread(
            stop_watches, [self._thread], [self._watch], "tier mapping watch thread"
        )
        await self._kube.release()
