"""A maas-api stand-in: ``/internal/v1/api-keys/validate`` and ``/internal/v1/subscriptions/select``.

Written from opendatahub-io/models-as-a-service at c0639b1b, never from the sidecar's readers, so
the two can disagree: ``maas-api/internal/api_keys/{handler,service,keygen,types}.go`` (key format
``sk-oai-{id}_{secret}``, stored as sha256(id + NUL + secret), ``ValidationResult``) and
``maas-api/internal/subscription/{handler,selector,types}.go`` with
``maas-api/internal/authpolicy/checker.go`` (``SelectResponse``, always HTTP 200). It reads
MaaSSubscription, MaaSAuthPolicy and MaaSModelRef objects as YAML, and a key table:
``keys: [{key, id, name, username, groups, subscription, status}]`` (``key`` in clear: this is a
local double; it stores only the salted hash, as maas-api does).

``make run`` (``maas.era: subscriptions``) and the tests start it on loopback, over HTTPS when
given a certificate. It counts the calls to each endpoint in ``calls``.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import ssl
import threading
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

Json = dict[str, Any]

KEY_PREFIX = "sk-oai-"
_BASE62 = re.compile(r"^[0-9A-Za-z]+$")
_PHASES = ("Active", "Degraded")
_KINDS = {"MaaSSubscription", "MaaSAuthPolicy", "MaaSModelRef"}


def salted_hash(key: str) -> str:
    """maas-api's stored form of a key: sha256(key_id + "\\x00" + secret), hex; "" if malformed."""
    if not key.startswith(KEY_PREFIX):
        return ""
    key_id, sep, secret = key[len(KEY_PREFIX) :].partition("_")
    if not sep or not _BASE62.match(key_id) or not _BASE62.match(secret):
        return ""
    return hashlib.sha256(f"{key_id}\x00{secret}".encode()).hexdigest()


class MaasApiStandIn:
    """The two internal endpoints over a set of objects and keys, replaceable while it runs."""

    def __init__(self, objects: Iterable[Json] = (), keys: Iterable[Json] = ()) -> None:
        self.calls: Counter[str] = Counter()
        self.fail_status = 0  # answer every call with this status (0: serve normally)
        self._objects: list[Json] = []
        self._keys: dict[str, Json] = {}
        self.set_objects(objects)
        self.set_keys(keys)
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.scheme = "http"

    # ------------------------------------------------------------------ data

    def set_objects(self, objects: Iterable[Json]) -> None:
        self._objects = [o for o in objects if isinstance(o, dict) and o.get("kind") in _KINDS]

    def set_keys(self, keys: Iterable[Json]) -> None:
        self._keys = {salted_hash(str(k["key"])): dict(k) for k in keys}

    @classmethod
    def from_files(cls, objects: Path, keys: Path) -> MaasApiStandIn:
        docs = [d for d in yaml.safe_load_all(objects.read_text()) if d]
        return cls(docs, (yaml.safe_load(keys.read_text()) or {}).get("keys") or [])

    # ------------------------------------------------------------------ serving

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/internal/v1/api-keys/validate", self._validate)
        app.router.add_post("/internal/v1/subscriptions/select", self._select)
        return app

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None
    ) -> int:
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port, ssl_context=tls).start()
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self.scheme = "https" if tls else "http"
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start_in_thread(self, tls: ssl.SSLContext | None = None) -> MaasApiStandIn:
        """Serve from a thread of its own (synchronous tests, other processes)."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="maas-api", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.start(tls=tls), loop).result(timeout=10)
        return self

    def stop_thread(self) -> None:
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = self._thread = None

    # ------------------------------------------------------------------ validate

    async def _validate(self, request: web.Request) -> web.Response:
        self.calls["validate"] += 1
        if self.fail_status:
            return web.json_response({"error": "validation failed"}, status=self.fail_status)
        body = await _json_body(request)
        key = body.get("key") if isinstance(body, dict) else None
        if not isinstance(key, str) or not key:
            return web.json_response({"error": "key is required"}, status=400)
        digest = salted_hash(key)
        if not digest:
            return web.json_response(_invalid("invalid key format"))
        stored = self._keys.get(digest)
        if stored is None:
            return web.json_response(_invalid("key not found"))
        if stored.get("status", "active") != "active":
            return web.json_response(_invalid("key revoked or expired"))
        if not str(stored.get("subscription") or "").strip():
            return web.json_response(_invalid("key has no subscription bound"))
        result: Json = {
            "valid": True,
            "userId": stored["id"],
            "username": stored["username"],
            "keyId": stored["id"],
            "groups": list(stored.get("groups") or []),
            "subscription": stored["subscription"],
            "tenant": "",
        }
        if stored.get("name"):
            result["keyName"] = stored["name"]
        return web.json_response(result)

    # ------------------------------------------------------------------ select

    async def _select(self, request: web.Request) -> web.Response:
        self.calls["select"] += 1
        if self.fail_status:
            return web.json_response({"error": "internal"}, status=self.fail_status)
        body = await _json_body(request)
        problem = _bind_problem(body)
        if problem:
            return web.json_response({"error": "bad_request", "message": problem, **_EMPTY})
        answer = self.select(
            body.get("groups") or [],
            body["username"],
            body.get("requestedSubscription") or "",
            body.get("requestedModel") or "",
        )
        return web.json_response(answer)

    def select(self, groups: list[str], username: str, requested: str, model: str) -> Json:
        """``Selector.Select`` and the handler's mapping of its errors to codes."""
        if not groups and not username:
            return _error(
                "internal_error",
                "failed to select subscription: either groups or username must be provided",
            )
        aliases = {
            _status(m).get("resolvedModelAlias"): f"{_ns(m)}/{_name(m)}"
            for m in reversed(self._of("MaaSModelRef"))
            if _status(m).get("resolvedModelAlias")
        }
        model = aliases.get(model, model) if model else model
        subs = self._of("MaaSSubscription")
        if not subs:
            return _error("not_found", "no matching subscription found for user")
        subs.sort(key=lambda s: (-_priority(s), -_max_limit(s), _name(s)))
        if requested:
            found = next((s for s in subs if f"{_ns(s)}/{_name(s)}" == requested), None)
            if found is None and "/" not in requested:
                found = next((s for s in subs if _name(s) == requested), None)
            if found is None:
                return _error("not_found", "requested subscription not found")
            if not _owner(found, username, groups):
                return _error("access_denied", "access denied to requested subscription")
            if model and self._find_ref(found, model) is None:
                return _error(
                    "model_not_in_subscription",
                    f"subscription {requested} does not include model {model}",
                )
            chosen = found
        else:
            mine = [
                s
                for s in subs
                if _owner(s, username, groups)
                and (not model or self._find_ref(s, model) is not None)
            ]
            if not mine:
                return _error("not_found", "no matching subscription found for user")
            if len(mine) > 1:
                return _error(
                    "multiple_subscriptions",
                    "user has access to multiple subscriptions, must specify subscription "
                    "using X-MaaS-Subscription header",
                )
            chosen = mine[0]
        unhealthy = self._health(chosen, model)
        if unhealthy is not None:
            return unhealthy
        return self._response(chosen, model, groups, username)

    def _of(self, kind: str) -> list[Json]:
        return [o for o in self._objects if o.get("kind") == kind]

    def _alias(self, namespace: str, name: str) -> str:
        for m in self._of("MaaSModelRef"):
            if (_ns(m), _name(m)) == (namespace, name):
                return str(_status(m).get("resolvedModelAlias") or "")
        return ""

    def _find_ref(self, sub: Json, model: str) -> Json | None:
        refs = [r for r in (sub.get("spec") or {}).get("modelRefs") or [] if isinstance(r, dict)]
        if "/" in model:
            namespace, name = model.split("/", 1)
            for ref in refs:
                if ref.get("namespace") == namespace and ref.get("name") == name:
                    return ref
        for ref in refs:
            alias = self._alias(str(ref.get("namespace")), str(ref.get("name")))
            if (alias and alias == model) or ref.get("name") == model:
                return ref
        return None

    def _health(self, sub: Json, model: str) -> Json | None:
        phase = str(_status(sub).get("phase") or "").strip()
        if phase not in _PHASES:
            shown = phase or "unreconciled"
            return {
                **_error(
                    "model_unhealthy",
                    f"subscription is in {shown} phase (allowed: Active, Degraded)",
                ),
                "phase": phase,
            }
        if phase == "Active" or not model:
            return None
        ref = self._find_ref(sub, model)
        if ref is None:
            message = "requested model does not match any model in the subscription"
            return {**_error("model_unhealthy", message), "phase": phase}
        if not ref.get("tokenRateLimits"):
            return None
        for trlp in _status(sub).get("tokenRateLimitStatuses") or []:
            if isinstance(trlp, dict) and trlp.get("model") == ref.get("name"):
                if trlp.get("ready") is True:
                    return None
                break
        message = "subscription rate limiting policies are not ready"
        return {**_error("model_unhealthy", message), "phase": phase}

    def _response(self, sub: Json, model: str, groups: list[str], username: str) -> Json:
        spec = sub.get("spec") or {}
        metadata = spec.get("tokenMetadata") or {}
        refs = []
        for ref in spec.get("modelRefs") or []:
            item: Json = {"name": ref.get("name")}
            alias = self._alias(str(ref.get("namespace")), str(ref.get("name")))
            if alias:
                item["model_name"] = alias
            limits = [
                {"limit": _int64(r.get("limit")) or 0, "window": r.get("window") or ""}
                for r in ref.get("tokenRateLimits") or []
            ]
            if limits:
                item["token_rate_limits"] = limits
            # selector.go parseModelRef: a billingRate mapping gives billing_rate, its perToken
            # only when a string (types.go ModelRefInfo.BillingRate, `json:"per_token"`).
            rate = ref.get("billingRate")
            if isinstance(rate, dict):
                per_token = rate.get("perToken")
                item["billing_rate"] = {
                    "per_token": per_token if isinstance(per_token, str) else ""
                }
            refs.append(item)
        answer: Json = {
            "name": _name(sub),
            "namespace": _ns(sub),
            "modelRefs": refs,
            "accessAllowed": self._access(sub, model, groups, username),
            "phase": str(_status(sub).get("phase") or ""),
            "ready": False,
        }
        if _priority(sub):
            answer["priority"] = _priority(sub)
        for field, source in (("organizationId", "organizationId"), ("costCenter", "costCenter")):
            if metadata.get(source):
                answer[field] = metadata[source]
        if model:
            answer["resolvedModel"] = model
        deleted = (sub.get("metadata") or {}).get("deletionTimestamp")
        if deleted:
            answer["deletionTimestamp"] = deleted
        return answer

    def _access(self, sub: Json, model: str, groups: list[str], username: str) -> bool:
        if not model:
            return True
        ref = self._find_ref(sub, model)
        if ref is None:
            return False
        held = {g.strip() for g in groups}
        for policy in self._of("MaaSAuthPolicy"):
            spec = policy.get("spec") or {}
            subjects = spec.get("subjects") or {}
            users = [u.strip() for u in subjects.get("users") or [] if isinstance(u, str)]
            names = [
                str(g.get("name", "")).strip()
                for g in subjects.get("groups") or []
                if isinstance(g, dict)
            ]
            if not ((username and username.strip() in users) or held & set(names)):
                continue
            for target in spec.get("modelRefs") or []:
                if (target.get("namespace"), target.get("name")) == (
                    ref.get("namespace"),
                    ref.get("name"),
                ):
                    return True
        return False


_EMPTY: Json = {"accessAllowed": False, "phase": "", "ready": False}


def _error(code: str, message: str) -> Json:
    return {"error": code, "message": message, **_EMPTY}


def _invalid(reason: str) -> Json:
    return {"valid": False, "tenant": "", "reason": reason}


def _bind_problem(body: object) -> str:
    """What gin's ShouldBindJSON refuses in a SelectRequest."""
    if not isinstance(body, dict):
        return "invalid request body: not a JSON object"
    groups = body.get("groups")
    if groups is not None and not (
        isinstance(groups, list) and all(isinstance(g, str) for g in groups)
    ):
        return "invalid request body: groups must be a list of strings"
    for name in ("requestedSubscription", "requestedModel"):
        if body.get(name) is not None and not isinstance(body[name], str):
            return f"invalid request body: {name} must be a string"
    username = body.get("username")
    if not isinstance(username, str) or not username:
        return (
            "invalid request body: Key: 'SelectRequest.Username' Error:Field validation for "
            "'Username' failed on the 'required' tag"
        )
    return ""


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        return None


def _name(obj: Json) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


def _ns(obj: Json) -> str:
    return str((obj.get("metadata") or {}).get("namespace", ""))


def _status(obj: Json) -> Json:
    status = obj.get("status")
    return status if isinstance(status, dict) else {}


def _int64(value: object) -> int | None:
    """What Go's ``.(int64)`` accepts from decoded JSON: an integer, not a bool."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _priority(sub: Json) -> int:
    value = _int64((sub.get("spec") or {}).get("priority"))
    return value if value is not None and 0 <= value <= 2**31 - 1 else 0


def _max_limit(sub: Json) -> int:
    limits = [
        _int64(r.get("limit"))
        for ref in (sub.get("spec") or {}).get("modelRefs") or []
        for r in ref.get("tokenRateLimits") or []
    ]
    return max((v for v in limits if v is not None), default=0)


def _owner(sub: Json, username: str, groups: list[str]) -> bool:
    owner = (sub.get("spec") or {}).get("owner") or {}
    if username in (owner.get("users") or []):
        return True
    names = {g.get("name") for g in owner.get("groups") or [] if isinstance(g, dict)}
    return any(g.strip() in names for g in groups)


async def serve_stand_in(
    host: str, port: int, stand_in: MaasApiStandIn, tls: ssl.SSLContext | None
) -> None:
    await stand_in.start(host, port, tls)
    try:
        await asyncio.Event().wait()
    finally:
        await stand_in.stop()
