"""A local Kubernetes API server over HTTPS: TokenReview, SubjectAccessReview, watched ConfigMaps
and watched custom objects (e.g. Kuadrant policies, HTTPRoutes), namespaced or cluster-wide.

It speaks the real JSON shapes so the official ``kubernetes`` client reaches it through a kubeconfig
(``write_kubeconfig``). Tests script it live: tokens, RBAC rules, ConfigMap contents, custom
objects (``define_custom``, ``put_custom``, ``delete_custom``), failures (``fail_with(503)``,
``down()`` / ``up()``), and read request counters per endpoint and ``audit``: each request as
the API server's authorizer sees it (verb, group, resource, namespace, name).

Malformed requests get the API server's answers, each a ``Status`` object
(k8s.io/apimachinery ``pkg/api/errors/errors.go``: ``NewBadRequest`` 400, ``NewInvalid`` 422):
a TokenReview without ``spec.token`` (kubernetes ``pkg/registry/authentication/tokenreview/
storage.go``), a SubjectAccessReview without exactly one of ``resourceAttributes`` /
``nonResourceAttributes``, without user and groups, or with metadata (``pkg/apis/authorization/
validation/validation.go``), a body that is not the expected kind, a field selector on a field
other than ``metadata.name`` / ``metadata.namespace`` ("field label not supported", as for
custom resources without selectable fields), or a label selector that does not parse.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import itertools
import json
import re
import secrets
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from aiohttp import web

# The plural each custom kind is served under (spec.names.plural of its CRD): Kuadrant's policies,
# Gateway API's HTTPRoute, and MaaS's (opendatahub-io/models-as-a-service
# deployment/base/maas-controller/crd/bases/maas.opendatahub.io_*.yaml at c0639b1b).
PLURALS = {
    "TokenRateLimitPolicy": "tokenratelimitpolicies",
    "RateLimitPolicy": "ratelimitpolicies",
    "HTTPRoute": "httproutes",
    "MaaSSubscription": "maassubscriptions",
    "MaaSAuthPolicy": "maasauthpolicies",
    "MaaSModelRef": "maasmodelrefs",
}
DEFAULT_AUDIENCE = "maas-default-gateway-sa"
API_SERVER_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
CLIENT_TOKEN = "sidecar-own-service-account-token"
# The collection ConfigMaps live in; custom objects live in "<group>/<version>/<plural>".
CONFIG_MAPS = "v1/configmaps"

Json = dict[str, Any]


@dataclass(frozen=True)
class TokenSpec:
    """What the API server knows about one token."""

    username: str
    groups: tuple[str, ...] = ()
    audiences: tuple[str, ...] = (DEFAULT_AUDIENCE,)
    exp: float | None = None  # unix seconds; the emulator's clock decides expiry


@dataclass(frozen=True)
class AllowRule:
    """RBAC in one line: ``subject`` (a username or ``group:<name>``) may post to ns/name."""

    subject: str
    namespace: str
    name: str = "*"
    verb: str = "post"
    group: str = "serving.kserve.io"
    resource: str = "llminferenceservices"


class ApiRequest(NamedTuple):
    """One request as RBAC authorizes it: list and watch with a ``metadata.name`` field selector
    are authorized for that name (what lets ``resourceNames`` restrict them)."""

    verb: str  # create, get, list, watch
    group: str  # "" for the core group
    resource: str
    namespace: str  # "" for cluster-scoped resources and cluster-wide lists
    name: str = ""


class Refused(Exception):
    """A request the API server answers with a Status instead of doing it."""

    def __init__(self, code: int, reason: str, message: str, details: Json | None = None) -> None:
        super().__init__(message)
        self.response = _status(code, reason, message, details)


@dataclass
class _Event:
    collection: str  # CONFIG_MAPS or <group>/<version>/<plural>
    rv: int
    kind: str  # ADDED, MODIFIED, DELETED
    obj: Json


@dataclass
class _State:
    tokens: dict[str, TokenSpec] = field(default_factory=dict)
    rules: list[AllowRule] = field(default_factory=list)
    # (collection, namespace, name) -> the object as served
    objects: dict[tuple[str, str, str], Json] = field(default_factory=dict)
    custom_kinds: dict[str, str] = field(default_factory=dict)  # served collection -> Kind
    history: list[_Event] = field(default_factory=list)  # of every collection: one version sequence
    oldest_rv: int = 0  # a watch from before this answers 410 Gone
    fail_status: int | None = None


def mint_token(claims: Json) -> str:
    """A JWT-shaped token (header.payload.signature); only the emulator's table makes it valid."""

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = part(json.dumps({"alg": "RS256", "kid": "emulator"}).encode())
    payload = part(json.dumps(claims).encode())
    return f"{header}.{payload}.{part(secrets.token_bytes(32))}"


def self_signed_cert(workdir: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, generated with the openssl CLI."""
    cert, key = workdir / "apiserver.crt", workdir / "apiserver.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=kube-emulator",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


class KubeEmulator:
    """The emulator; ``start`` runs it in a thread with its own event loop, ``stop`` ends both."""

    def __init__(self, workdir: Path, clock: Callable[[], float] = time.time) -> None:
        self.workdir = workdir
        self.clock = clock
        self.counts: Counter[str] = Counter()
        self.audit: list[ApiRequest] = []  # every authenticated request, in order
        self.access_reviews: list[Json] = []  # SubjectAccessReview specs received, in order
        self.port = 0
        self._state = _State()
        self._lock = threading.Lock()
        self._rv = itertools.count(100)
        self._cert, self._key = self_signed_cert(workdir)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._changed: asyncio.Event | None = None
        self._closing: asyncio.Event | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> KubeEmulator:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="kube-emulator", daemon=True)
        self._thread.start()
        self._call(self._init_events())
        self.up()
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self.down()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = None
        self._thread = None

    def up(self) -> None:
        """Listen (again, on the same port)."""
        self._call(self._serve())

    def down(self) -> None:
        """Stop listening and drop every open connection, watches included."""
        self._call(self._shutdown())

    def __enter__(self) -> KubeEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_pem(self) -> bytes:
        return self._cert.read_bytes()

    def write_kubeconfig(self, path: Path | None = None, token: str = CLIENT_TOKEN) -> Path:
        """A kubeconfig trusting the emulator's certificate and carrying the sidecar's token."""
        path = path or self.workdir / "kubeconfig"
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "emulator",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": base64.b64encode(self.ca_pem).decode(),
                    },
                }
            ],
            "users": [{"name": "maas-extproc", "user": {"token": token}}],
            "contexts": [
                {"name": "emulator", "context": {"cluster": "emulator", "user": "maas-extproc"}}
            ],
            "current-context": "emulator",
        }
        path.write_text(yaml.safe_dump(doc))
        return path

    # ------------------------------------------------------------------ scripting

    def add_token(
        self,
        username: str,
        groups: Iterable[str] = (),
        *,
        audiences: Iterable[str] = (DEFAULT_AUDIENCE,),
        exp: float | None = None,
        token: str | None = None,
    ) -> str:
        """Register a token and return it (JWT-shaped, with ``exp`` in its payload when given)."""
        if token is None:
            claims: Json = {"iss": "kube-emulator", "sub": username, "aud": list(audiences)}
            if exp is not None:
                claims["exp"] = int(exp)
            token = mint_token(claims)
        with self._lock:
            self._state.tokens[token] = TokenSpec(username, tuple(groups), tuple(audiences), exp)
        return token

    def add_sa_token(
        self,
        namespace: str,
        name: str,
        extra_groups: Iterable[str] = (),
        **kwargs: Any,
    ) -> str:
        """A service-account token with the groups Kubernetes gives it."""
        groups = [
            "system:serviceaccounts",
            f"system:serviceaccounts:{namespace}",
            "system:authenticated",
            *extra_groups,
        ]
        return self.add_token(f"system:serviceaccount:{namespace}:{name}", groups, **kwargs)

    def allow(self, subject: str, namespace: str, name: str = "*") -> None:
        with self._lock:
            self._state.rules.append(AllowRule(subject, namespace, name))

    def fail_with(self, status: int | None) -> None:
        """Answer every API request with this HTTP status (None: serve normally)."""
        with self._lock:
            self._state.fail_status = status

    def set_config_map(self, namespace: str, name: str, data: dict[str, str]) -> str:
        """Create or replace a ConfigMap; watchers see ADDED or MODIFIED. Returns its resourceVersion."""
        obj: Json = {"kind": "ConfigMap", "apiVersion": "v1", "data": dict(data)}
        return self._put(CONFIG_MAPS, namespace, name, obj)

    def delete_config_map(self, namespace: str, name: str) -> None:
        self._delete(CONFIG_MAPS, namespace, name)

    def define_custom(self, group: str, version: str, plural: str, kind: str) -> None:
        """Serve a custom resource (as installing its CRD does); until then its URLs answer 404."""
        with self._lock:
            self._state.custom_kinds[_collection(group, version, plural)] = kind

    def put_custom(self, group: str, version: str, namespace: str, plural: str, obj: Json) -> str:
        """Create or replace a custom object (a copy of ``obj``, which needs ``metadata.name``);
        watchers see ADDED or MODIFIED. Serves the resource if not yet defined, with the
        object's ``kind``. Returns the new resourceVersion."""
        collection = _collection(group, version, plural)
        with self._lock:
            kind = self._state.custom_kinds.get(collection) or obj.get("kind")
        if not kind:
            raise ValueError(f"{collection}: give the object a kind or call define_custom first")
        self.define_custom(group, version, plural, kind)
        body = {**copy.deepcopy(obj), "apiVersion": f"{group}/{version}", "kind": kind}
        return self._put(collection, namespace, str(obj["metadata"]["name"]), body)

    def put_objects(self, docs: Iterable[Json]) -> None:
        """``put_custom`` each object by its ``apiVersion`` and ``kind`` (``PLURALS``), as
        ``kubectl apply`` of a multi-document YAML file would."""
        for obj in docs:
            group, version = str(obj["apiVersion"]).split("/")
            namespace = str(obj["metadata"].get("namespace", ""))
            self.put_custom(group, version, namespace, PLURALS[obj["kind"]], obj)

    def delete_custom(
        self, group: str, version: str, namespace: str, plural: str, name: str
    ) -> str:
        """Delete a custom object; watchers see DELETED. Returns the deletion's resourceVersion."""
        return self._delete(_collection(group, version, plural), namespace, name)

    def get_custom(self, group: str, version: str, namespace: str, plural: str, name: str) -> Json:
        """The stored custom object (a copy), as the API serves it."""
        with self._lock:
            obj = self._state.objects[(_collection(group, version, plural), namespace, name)]
            return copy.deepcopy(obj)

    def compact(self) -> None:
        """Forget the event history: a watch resumed from any earlier version gets 410 Gone."""
        with self._lock:
            self._state.history.clear()
            self._state.oldest_rv = next(self._rv)

    def drop_watches(self) -> None:
        """End every open watch (clients must resume with their last resourceVersion)."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._end_watches)

    # ------------------------------------------------------------------ plumbing

    def _latest_rv(self) -> int:
        """The newest resourceVersion a list reports (call with the lock held)."""
        return self._state.history[-1].rv if self._state.history else self._state.oldest_rv

    def _put(self, collection: str, namespace: str, name: str, obj: Json) -> str:
        with self._lock:
            rv = next(self._rv)
            key = (collection, namespace, name)
            known = key in self._state.objects
            meta = {
                **(obj.get("metadata") or {}),
                "name": name,
                "namespace": namespace,
                "resourceVersion": str(rv),
                "uid": f"uid-{namespace}-{name}",
            }
            stored = {**obj, "metadata": meta}
            self._state.objects[key] = stored
            self._state.history.append(
                _Event(collection, rv, "MODIFIED" if known else "ADDED", stored)
            )
        self._notify()
        return str(rv)

    def _delete(self, collection: str, namespace: str, name: str) -> str:
        with self._lock:
            obj = self._state.objects.pop((collection, namespace, name))
            rv = next(self._rv)
            gone = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(rv)}}
            self._state.history.append(_Event(collection, rv, "DELETED", gone))
        self._notify()
        return str(rv)

    def _call(self, coro: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _init_events(self) -> None:
        self._changed = asyncio.Event()
        self._closing = asyncio.Event()

    def _notify(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        assert self._changed is not None
        self._changed.set()
        self._changed = asyncio.Event()

    def _end_watches(self) -> None:
        assert self._closing is not None
        self._closing.set()
        self._closing = asyncio.Event()

    async def _serve(self) -> None:
        if self._runner is not None:
            return
        app = web.Application(middlewares=[_refusals])
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", self._token_review)
        app.router.add_post(
            "/apis/authorization.k8s.io/v1/subjectaccessreviews", self._access_review
        )
        app.router.add_get("/api/v1/namespaces/{ns}/configmaps/{name}", self._get_config_map)
        app.router.add_get("/api/v1/namespaces/{ns}/configmaps", self._list_config_maps)
        custom = "/apis/{group}/{version}/namespaces/{ns}/{plural}"
        app.router.add_get(custom, self._list_custom)
        app.router.add_get(custom + "/{name}", self._get_custom)
        app.router.add_get("/apis/{group}/{version}/{plural}", self._list_custom)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self._cert, self._key)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=context).start()
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def _shutdown(self) -> None:
        if self._runner is None:
            return
        self._end_watches()
        runner, self._runner = self._runner, None
        await runner.cleanup()

    def _admit(self, request: web.Request, asked: ApiRequest) -> None:
        """Authenticate the caller (the sidecar's own token), fail when told to, then record the
        request as the authorizer sees it."""
        if request.headers.get("Authorization") != f"Bearer {CLIENT_TOKEN}":
            raise Refused(401, "Unauthorized", "Unauthorized")
        with self._lock:
            failing = self._state.fail_status
        if failing is not None:
            raise Refused(failing, "ServiceUnavailable", "the emulator was told to fail")
        self.audit.append(asked)

    async def _body(self, request: web.Request, kind: str, api_version: str) -> Json:
        """The request's object, refused as the API server's decoder refuses it."""
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as exc:
            raise Refused(
                400, "BadRequest", f"the request body could not be decoded: {exc}"
            ) from None
        if not isinstance(body, dict):
            raise Refused(400, "BadRequest", f"the object provided is unrecognized: {body!r}")
        if body.get("kind", kind) != kind or body.get("apiVersion", api_version) != api_version:
            raise Refused(
                400,
                "BadRequest",
                f"the object provided is unrecognized (must be of type {kind}): "
                f"{body.get('apiVersion')}, Kind={body.get('kind')}",
            )
        return body

    async def _token_review(self, request: web.Request) -> web.Response:
        self.counts["tokenreviews"] += 1
        self._admit(request, ApiRequest("create", "authentication.k8s.io", "tokenreviews", ""))
        review = await self._body(request, "TokenReview", "authentication.k8s.io/v1")
        spec = review.get("spec") or {}
        token = spec.get("token")
        if not isinstance(token, str) or not token:
            raise Refused(400, "BadRequest", "token is required for TokenReview in authentication")
        wanted = list(spec.get("audiences") or [API_SERVER_AUDIENCE])
        with self._lock:
            known = self._state.tokens.get(token)
        status: Json
        if known is None:
            status = {"user": {}, "error": "[invalid bearer token, token lookup failed]"}
        elif known.exp is not None and self.clock() >= known.exp:
            status = {"user": {}, "error": "[invalid bearer token, token has expired]"}
        elif not (shared := [a for a in wanted if a in known.audiences]):
            status = {
                "user": {},
                "error": f"[invalid bearer token, token audiences {list(known.audiences)} "
                f"is invalid for the target audiences {wanted}]",
            }
        else:
            status = {
                "authenticated": True,
                "user": {
                    "username": known.username,
                    "uid": f"uid-{known.username}",
                    "groups": list(known.groups),
                },
                "audiences": shared,
            }
        body = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }
        return web.json_response(body, status=201)

    async def _access_review(self, request: web.Request) -> web.Response:
        self.counts["subjectaccessreviews"] += 1
        self._admit(
            request, ApiRequest("create", "authorization.k8s.io", "subjectaccessreviews", "")
        )
        review = await self._body(request, "SubjectAccessReview", "authorization.k8s.io/v1")
        spec = review.get("spec") or {}
        _validate_access_review(review, spec)
        self.access_reviews.append(spec)
        attrs = spec.get("resourceAttributes") or {}
        subjects = {spec.get("user", "")} | {f"group:{g}" for g in spec.get("groups") or []}
        with self._lock:
            rules = list(self._state.rules)
        allowed = any(
            rule.subject in subjects
            and rule.namespace == attrs.get("namespace")
            and rule.name in ("*", attrs.get("name"))
            and rule.verb == attrs.get("verb")
            and rule.group == attrs.get("group")
            and rule.resource == attrs.get("resource")
            for rule in rules
        )
        status: Json = {"allowed": allowed}
        if allowed:
            status["reason"] = "RBAC: allowed by the emulator's rules"
        body = {
            "kind": "SubjectAccessReview",
            "apiVersion": "authorization.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }
        return web.json_response(body, status=201)

    async def _get_config_map(self, request: web.Request) -> web.Response:
        self.counts["configmap_get"] += 1
        ns, name = request.match_info["ns"], request.match_info["name"]
        self._admit(request, ApiRequest("get", "", "configmaps", ns, name))
        with self._lock:
            obj = self._state.objects.get((CONFIG_MAPS, ns, name))
        if obj is None:
            return _status(404, "NotFound", f'configmaps "{name}" not found')
        return web.json_response(obj)

    async def _list_config_maps(self, request: web.Request) -> web.StreamResponse:
        return await self._list_or_watch(request, CONFIG_MAPS, "configmap", "v1", "ConfigMap")

    def _custom_kind(self, request: web.Request) -> tuple[str, str | None]:
        """The collection a custom-object URL names, and its Kind (None: not served)."""
        info = request.match_info
        collection = _collection(info["group"], info["version"], info["plural"])
        with self._lock:
            return collection, self._state.custom_kinds.get(collection)

    async def _list_custom(self, request: web.Request) -> web.StreamResponse:
        collection, kind = self._custom_kind(request)
        info = request.match_info
        if kind is None:  # no such CRD installed
            self.counts[f"{info['plural']}_unknown"] += 1
            verb = "watch" if _watching(request) else "list"
            self._admit(
                request, ApiRequest(verb, info["group"], info["plural"], info.get("ns", ""))
            )
            return _status(404, "NotFound", "the server could not find the requested resource")
        api_version = f"{info['group']}/{info['version']}"
        return await self._list_or_watch(request, collection, info["plural"], api_version, kind)

    async def _get_custom(self, request: web.Request) -> web.Response:
        collection, kind = self._custom_kind(request)
        info = request.match_info
        self.counts[f"{info['plural']}_get"] += 1
        self._admit(
            request, ApiRequest("get", info["group"], info["plural"], info["ns"], info["name"])
        )
        with self._lock:
            obj = self._state.objects.get((collection, info["ns"], info["name"]))
        if kind is None or obj is None:
            what = f'{info["plural"]}.{info["group"]} "{info["name"]}"'
            return _status(404, "NotFound", f"{what} not found")
        return web.json_response(obj)

    async def _list_or_watch(
        self, request: web.Request, collection: str, counter: str, api_version: str, kind: str
    ) -> web.StreamResponse:
        """A list (``<Kind>List``) or, with ``?watch=true``, a watch of one collection, in one
        namespace or (no ``ns`` in the URL) across the cluster; counted as ``<counter>_list`` /
        ``<counter>_watch``."""
        watching = _watching(request)
        self.counts[f"{counter}_watch" if watching else f"{counter}_list"] += 1
        ns = request.match_info.get("ns", "")
        group_version, _, resource = collection.rpartition("/")
        group = group_version.rpartition("/")[0]  # "v1" (core) has no group
        self._admit(
            request,
            ApiRequest(
                "watch" if watching else "list",
                group,
                resource,
                ns,
                _selected_name(request.query.get("fieldSelector", "")),
            ),
        )
        fields = _field_selector(request.query.get("fieldSelector", ""))
        labels = _label_selector(request.query.get("labelSelector", ""))

        def matches(obj: Json) -> bool:
            meta = obj["metadata"]
            values = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"]}
            if ns and meta["namespace"] != ns:
                return False
            if not all((values[name] == value) == equal for name, equal, value in fields):
                return False
            return all(test(meta.get("labels") or {}) for test in labels)

        if watching:
            return await self._watch(request, collection, matches)
        with self._lock:
            items = [
                o for (c, _, _), o in self._state.objects.items() if c == collection and matches(o)
            ]
            current = self._latest_rv()
        body = {
            "kind": f"{kind}List",
            "apiVersion": api_version,
            "metadata": {"resourceVersion": str(current)},
            "items": items,
        }
        return web.json_response(body)

    async def _watch(
        self, request: web.Request, collection: str, matches: Callable[[Json], bool]
    ) -> web.StreamResponse:
        assert self._closing is not None
        closing = self._closing
        since_text = request.query.get("resourceVersion", "")
        timeout_s = float(request.query.get("timeoutSeconds", "1800"))
        deadline = asyncio.get_running_loop().time() + timeout_s
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)

        async def send(kind: str, obj: Json) -> None:
            line = json.dumps({"type": kind, "object": obj}) + "\n"
            await response.write(line.encode())

        def wanted(event: _Event) -> bool:
            return event.collection == collection and matches(event.obj)

        with self._lock:
            oldest = self._state.oldest_rv
            snapshot = [
                o for (c, _, _), o in self._state.objects.items() if c == collection and matches(o)
            ]
            latest = self._latest_rv()
        if since_text in ("", "0"):  # "any version": the current objects, as ADDED events
            for obj in snapshot:
                await send("ADDED", obj)
            since = latest
        else:
            since = int(since_text)
            if since < oldest:
                await send("ERROR", _status_body(410, "Expired", "too old resource version"))
                await response.write_eof()
                return response
        while not closing.is_set():
            with self._lock:
                fresh = [e for e in self._state.history if e.rv > since and wanted(e)]
                last = self._state.history[-1].rv if self._state.history else since
            for event in fresh:
                await send(event.kind, event.obj)
            since = max(since, last)
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            assert self._changed is not None
            changed = asyncio.ensure_future(self._changed.wait())
            ended = asyncio.ensure_future(closing.wait())
            _, pending = await asyncio.wait(
                {changed, ended}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            for task in pending:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response


def _collection(group: str, version: str, plural: str) -> str:
    return f"{group}/{version}/{plural}"


@web.middleware
async def _refusals(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A refused request answers with its Status, whatever the handler was doing."""
    try:
        return await handler(request)
    except Refused as refused:
        return refused.response


def _watching(request: web.Request) -> bool:
    return request.query.get("watch") in ("true", "1")


_SELECTABLE = ("metadata.name", "metadata.namespace")
# A qualified label key (optional DNS prefix) or value; k8s.io/apimachinery validation, in short.
_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_SET_TERM = re.compile(r"^(\S+)\s+(in|notin)\s+\(([^()]*)\)$")


def _field_selector(selector: str) -> list[tuple[str, bool, str]]:
    """(field, equal, value) terms; 400 for a malformed term or a field custom resources and
    ConfigMaps cannot be selected on (only metadata.name and metadata.namespace)."""
    terms: list[tuple[str, bool, str]] = []
    for term in filter(None, selector.split(",")):
        for op in ("!=", "==", "="):
            if op in term:
                name, _, value = term.partition(op)
                break
        else:
            raise Refused(
                400, "BadRequest", f"invalid selector: '{selector}'; can't understand '{term}'"
            )
        if name not in _SELECTABLE:
            raise Refused(400, "BadRequest", f"field label not supported: {name}")
        terms.append((name, op != "!=", value))
    return terms


def _selected_name(selector: str) -> str:
    """The one object a ``metadata.name=<name>`` field selector names ("" when none): RBAC
    authorizes such a list or watch as a request for that name."""
    for term in filter(None, selector.split(",")):
        name, op, value = term.replace("==", "=").partition("=")
        if op and name == "metadata.name" and not name.endswith("!"):
            return value
    return ""


def _label_selector(selector: str) -> list[Callable[[dict[str, str]], bool]]:
    """Label requirements (``k``, ``!k``, ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``,
    ``k notin (a,b)``); 400 for one that does not parse."""
    tests: list[Callable[[dict[str, str]], bool]] = []
    for term in _split_outside_parentheses(selector):
        term = term.strip()
        requirement = _requirement(term)
        if requirement is None:
            raise Refused(400, "BadRequest", f"unable to parse requirement: {term!r}")
        tests.append(requirement)
    return tests


def _split_outside_parentheses(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if current or parts:
        parts.append(current)
    return [part for part in parts if part.strip()] if text else []


def _requirement(term: str) -> Callable[[dict[str, str]], bool] | None:
    if match := _SET_TERM.match(term):
        key, op = match[1], match[2]
        values = {v.strip() for v in match[3].split(",")}
        if not _LABEL_KEY.match(key) or not all(_LABEL_VALUE.match(v) for v in values):
            return None
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    for op in ("!=", "==", "="):
        if op in term:
            key, _, value = (part.strip() for part in term.partition(op))
            if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
                return None
            if op == "!=":
                return lambda labels: labels.get(key) != value
            return lambda labels: labels.get(key) == value
    negated = term.startswith("!")
    key = term[1:].strip() if negated else term
    if not _LABEL_KEY.match(key):
        return None
    return (lambda labels: key not in labels) if negated else (lambda labels: key in labels)


def _validate_access_review(review: Json, spec: Json) -> None:
    """422 Invalid for what ``ValidateSubjectAccessReview`` refuses, every error at once."""
    errors: list[tuple[str, object, str]] = []
    resource, non_resource = spec.get("resourceAttributes"), spec.get("nonResourceAttributes")
    if resource is not None and non_resource is not None:
        errors.append(
            (
                "spec.nonResourceAttributes",
                non_resource,
                "cannot be specified in combination with resourceAttributes",
            )
        )
    if resource is None and non_resource is None:
        errors.append(
            (
                "spec.resourceAttributes",
                None,
                "exactly one of nonResourceAttributes or resourceAttributes must be specified",
            )
        )
    if not spec.get("user") and not spec.get("groups"):
        errors.append(
            ("spec.user", spec.get("user", ""), "at least one of user or group must be specified")
        )
    metadata = {k: v for k, v in (review.get("metadata") or {}).items() if k != "managedFields"}
    if any(v not in (None, "", {}, []) for v in metadata.values()):
        errors.append(("metadata", metadata, "must be empty"))
    if not errors:
        return
    causes = [
        {
            "reason": "FieldValueInvalid",
            "message": f"Invalid value: {json.dumps(value)}: {detail}",
            "field": where,
        }
        for where, value, detail in errors
    ]
    texts = [f"{c['field']}: {c['message']}" for c in causes]
    aggregate = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
    raise Refused(
        422,
        "Invalid",
        f'SubjectAccessReview.authorization.k8s.io "" is invalid: {aggregate}',
        {
            "group": "authorization.k8s.io",
            "kind": "SubjectAccessReview",
            "name": "",
            "causes": causes,
        },
    )


def _status_body(code: int, reason: str, message: str, details: Json | None = None) -> Json:
    body: Json = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details is not None:
        body["details"] = details
    return body


def _status(code: int, reason: str, message: str, details: Json | None = None) -> web.Response:
    return web.json_response(_status_body(code, reason, message, details), status=code)
