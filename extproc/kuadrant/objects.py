"""Custom objects (Kuadrant policies, HTTPRoutes) kept current by one list-then-watch thread each.

The owner reads nothing from here directly: after every change, ``on_change`` gets a sorted
snapshot of every object of every collection, called under one lock so that two threads never
hand over views out of order. The last good view stays in force while the API server is away.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kubernetes import client, watch

from extproc.authz.kube import CONNECT_TIMEOUT_S, Kube, run_list_watch, stop_watches

Json = dict[str, Any]
Key = tuple[str, str, str]  # (plural, namespace, name)
Snapshot = list[tuple[Key, Json]]


@dataclass(frozen=True, slots=True)
class Collection:
    """One collection to keep: namespaced (``namespace``) or across the cluster (``""``)."""

    group: str
    version: str
    plural: str
    namespace: str = ""
    label_selector: str = ""


class ObjectWatch:
    """One thread per collection lists it and follows its watch (list again on 410 Gone, back off
    on other errors). ``close`` stops the threads; the owner releases ``kube``."""

    def __init__(
        self,
        kube: Kube,
        collections: Iterable[Collection],
        on_change: Callable[[Snapshot], None],
        *,
        watch_timeout_s: int = 300,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        on_listed: Callable[[str], None] = lambda _plural: None,
    ) -> None:
        self._kube = kube
        self._custom = client.CustomObjectsApi(kube.api_client)
        self._on_change = on_change
        self._on_listed = on_listed  # a collection's list answered (before its on_change)
        self._watch_timeout_s = watch_timeout_s
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._lock = threading.Lock()
        self._objects: dict[Key, Json] = {}
        self._stop = threading.Event()
        self._closed = False
        self._watches: list[watch.Watch] = []
        self._threads: list[threading.Thread] = []
        for collection in collections:
            stream = watch.Watch()
            thread = threading.Thread(
                target=self._run,
                args=(collection, stream),
                name=f"watch-{collection.plural}",
                daemon=True,
            )
            self._watches.append(stream)
            self._threads.append(thread)
            thread.start()

    def _run(self, collection: Collection, stream: watch.Watch) -> None:
        run_list_watch(
            self._kube,
            self._stop,
            collection.plural,
            lambda: self._list(collection),
            lambda version: self._follow(collection, stream, version),
            backoff_s=self._backoff_s,
            max_backoff_s=self._max_backoff_s,
        )

    def _call_args(self, collection: Collection) -> tuple[Callable[..., Any], tuple[str, ...]]:
        """The client's list function for the collection and its positional arguments."""
        if collection.namespace:
            return self._custom.list_namespaced_custom_object, (
                collection.group,
                collection.version,
                collection.namespace,
                collection.plural,
            )
        return self._custom.list_cluster_custom_object, (
            collection.group,
            collection.version,
            collection.plural,
        )

    def _selectors(self, collection: Collection) -> dict[str, str]:
        return {"label_selector": collection.label_selector} if collection.label_selector else {}

    def _list(self, collection: Collection) -> str | None:
        function, args = self._call_args(collection)
        listed = function(*args, **self._selectors(collection), _request_timeout=self._kube.timeout)
        self._kube.note_success()
        items = {_key(collection, item): item for item in listed.get("items") or []}
        with self._lock:
            for key in [k for k in self._objects if k[0] == collection.plural]:
                del self._objects[key]
            self._objects.update(items)
            self._on_listed(collection.plural)
            self._changed_locked()
        return str((listed.get("metadata") or {}).get("resourceVersion") or "") or None

    def _follow(
        self, collection: Collection, stream: watch.Watch, version: str | None
    ) -> str | None:
        function, args = self._call_args(collection)
        events = stream.stream(
            function,
            *args,
            **self._selectors(collection),
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=self._watch_timeout_s,
            _request_timeout=(CONNECT_TIMEOUT_S, self._watch_timeout_s + 30),
        )
        try:
            for event in events:
                if self._stop.is_set():
                    break
                raw: Json = event.get("raw_object") or event.get("object") or {}
                with self._lock:
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        self._objects[_key(collection, raw)] = raw
                        self._changed_locked()
                    elif event.get("type") == "DELETED":
                        self._objects.pop(_key(collection, raw), None)
                        self._changed_locked()
                meta = raw.get("metadata") or {}
                version = str(meta.get("resourceVersion") or "") or version
        finally:
            events.close()
        return version

    def _changed_locked(self) -> None:
        self._on_change(sorted(self._objects.items(), key=lambda pair: pair[0]))

    async def close(self) -> None:
        """Stop the watch threads (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        await asyncio.to_thread(stop_watches, self._threads, self._watches, "watch threads")


def _key(collection: Collection, obj: Json) -> Key:
    meta = obj.get("metadata") or {}
    return (collection.plural, str(meta.get("namespace", "")), str(meta.get("name", "")))
