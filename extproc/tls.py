"""TLS on the gRPC port: credentials from PEM files, re-read when they change, and client names.

grpc asks ``CertificateFiles.fetch`` for a new configuration before the handshake of every new
connection (``grpc.dynamic_ssl_server_credentials``, grpc/grpc
src/python/grpcio/grpc/_cython/_cygrpc/credentials.pyx.pxi at 004ca72d). ``None`` keeps the
certificates in use; a new configuration serves that connection and every later one; one that
fails to load leaves the old one in place (src/core/credentials/transport/ssl/
ssl_security_connector.cc at 874cdb3c, which also serializes the calls under a mutex). So a rotated
Secret reaches the next connection without a restart, and open connections keep their session.
The fetch only compares ``stat`` results until the files change, because it runs on every accept.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import re
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import grpc

from extproc.config import Config, TlsConfig
from extproc.errors import ConfigError

log = logging.getLogger("extproc.tls")

CERT, KEY, CLIENT_CA = "server.tls.cert_file", "server.tls.key_file", "server.tls.client_ca_file"
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)
_MAX_LOGGED_REFUSALS = 64  # distinct refused identities logged; beyond, refusals stay silent

Stamp = tuple[tuple[int, int, int, int], ...]


@dataclass(frozen=True, slots=True)
class Pem:
    """One consistent read of the files."""

    cert: bytes
    key: bytes
    client_ca: bytes | None

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.key, self.cert)], self.client_ca)

    def fingerprint(self) -> str:
        """sha256 of the leaf certificate's DER, shortened: names the certificate in logs."""
        leaf = _PEM_CERT.search(self.cert)
        der = ssl.PEM_cert_to_DER_cert(leaf.group().decode("ascii")) if leaf else b""
        return hashlib.sha256(der).hexdigest()[:16]


class CertificateFiles:
    """The PEM files of ``server.tls``, read whole and checked before grpc ever sees them."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self._paths = {CERT: cert, KEY: key}
        if client_ca is not None:
            self._paths[CLIENT_CA] = client_ca
        self._seen: Stamp | None = None  # the files' state last tried
        self._current: Pem | None = None  # what grpc serves
        self._last_error = ""

    @property
    def paths(self) -> dict[str, Path]:
        """The files by their config key (``server.tls.cert_file``, ...)."""
        return dict(self._paths)

    @classmethod
    def from_config(cls, config: Config) -> CertificateFiles:
        tls = config.server.tls
        client_ca = config.path(tls.client_ca_file) if tls.client_ca_file else None
        return cls(config.path(tls.cert_file), config.path(tls.key_file), client_ca)

    def load(self) -> Pem:
        """Read and check the files; a ConfigError names the key of the file at fault."""
        before = self._stamp()
        pem = Pem(
            self._read(CERT),
            self._read(KEY),
            self._read(CLIENT_CA) if CLIENT_CA in self._paths else None,
        )
        self._check(pem)
        if self._stamp() != before:  # checked by path: make sure the paths still hold those bytes
            raise ConfigError(CERT, "files that stay unchanged while they are read (retrying)")
        return pem

    def initial(self) -> grpc.ServerCertificateConfiguration:
        """The configuration to start with; raises ConfigError (the server must not start)."""
        self._seen = self._stamp()
        self._current = self.load()
        log.info("tls: serving certificate sha256:%s", self._current.fingerprint())
        return self._current.configuration()

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's fetcher: a new configuration once the files changed and check out, else None.

        Never raises: grpc would log a traceback. A file set that does not check out is logged
        once and the certificate in use stays; the next change of the files is tried again.
        """
        try:
            stamp = self._stamp()
            if stamp == self._seen:
                return None
            self._seen = stamp
            pem = self.load()
        except Exception as exc:  # grpc calls this from its C core: see the docstring
            self._log_once(f"tls: keeping the certificate in use: {exc}")
            return None
        self._last_error = ""
        if pem == self._current:
            return None
        self._current = pem
        log.info("tls: certificate files changed, serving sha256:%s", pem.fingerprint())
        return pem.configuration()

    def _log_once(self, message: str) -> None:
        if message != self._last_error:
            self._last_error = message
            log.warning(message)

    def _stamp(self) -> Stamp:
        stamps = []
        for key, path in self._paths.items():
            try:
                st = os.stat(path)  # follows symlinks: a Secret volume swaps its ..data link
            except OSError as exc:
                raise ConfigError(key, "a readable file", f"{path}: {exc.strerror}") from exc
            stamps.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def _read(self, key: str) -> bytes:
        path = self._paths[key]
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ConfigError(key, "a readable file", f"{path}: {exc.strerror}") from exc

    def _check(self, pem: Pem) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        for key, data in ((CERT, pem.cert), (CLIENT_CA, pem.client_ca)):
            if data is None:
                continue
            if not _PEM_CERT.search(data):
                raise ConfigError(key, "PEM certificates", str(self._paths[key]))
            try:
                context.load_verify_locations(cadata=data.decode("ascii"))
            except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
                raise ConfigError(key, "PEM certificates", f"{self._paths[key]}: {exc}") from exc
        try:
            # password b"": an encrypted key fails here instead of OpenSSL prompting for one.
            context.load_cert_chain(self._paths[CERT], self._paths[KEY], password=b"")
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                KEY, f"the unencrypted PEM private key of {CERT}", f"{self._paths[KEY]}: {exc}"
            ) from exc


def server_credentials(files: CertificateFiles, settings: TlsConfig) -> grpc.ServerCredentials:
    """Credentials that start with the files as they are and follow them as they change."""
    return grpc.dynamic_ssl_server_credentials(
        files.initial(),
        files.fetch,  # type: ignore[arg-type]  # the stubs miss that None means "unchanged"
        require_client_authentication=settings.require_client_cert,
    )


def add_port(server: grpc.aio.Server, address: str, config: Config) -> int:
    """Bind ``address`` with TLS when ``server.tls`` is on, else in plain text; 0 if it failed."""
    if not config.server.tls.enabled:
        return server.add_insecure_port(address)
    credentials = server_credentials(CertificateFiles.from_config(config), config.server.tls)
    return server.add_secure_port(address, credentials)


def interceptors(settings: TlsConfig) -> list[grpc.aio.ServerInterceptor]:
    return [ClientNames(settings.client_names)] if settings.client_names else []


Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Any]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_HANDLER_KINDS: tuple[tuple[str, Callable[..., Handler]], ...] = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


class ClientNames(grpc.aio.ServerInterceptor):
    """Answers PERMISSION_DENIED to a call whose client certificate names none of ``names``.

    The names checked are what grpc reports as the peer's identity: the certificate's subject
    alternative names (URI, such as an Istio SPIFFE ID, or DNS), or its common name if it has no
    SAN. A CA signs for many clients (Istio's signs every workload of the mesh); this narrows
    the callers to the one that should call.
    """

    def __init__(self, names: Iterable[str]) -> None:
        self._names = frozenset(name.encode() for name in names)
        self._guarded: dict[str, Handler] = {}  # one per served method
        self._refused: set[tuple[bytes, ...]] = set()

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Request, _Response] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Request, _Response] | None:
        method = handler_call_details.method
        guarded = self._guarded.get(method)
        if guarded is None:
            handler = await continuation(handler_call_details)
            if handler is None:  # an unknown method: grpc answers UNIMPLEMENTED
                return handler
            guarded = self._guarded[method] = self._guard(handler)
        return guarded

    def _guard(self, handler: Handler) -> Handler:
        for kind, make in _HANDLER_KINDS:
            behavior = getattr(handler, kind)
            if behavior is not None:
                return make(
                    self._checked(behavior),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        raise TypeError(f"a method handler without a behavior: {handler!r}")

    def _checked(self, behavior: Behavior) -> Behavior:
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await self._admit(context)
                async for reply in behavior(request, context):
                    yield reply

            return stream
        if not inspect.iscoroutinefunction(behavior):
            raise TypeError(f"{behavior!r}: only async handlers are served")

        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await self._admit(context)
            return await behavior(request, context)

        return call

    async def _admit(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        identities = tuple(context.peer_identities() or ())
        if self._names.intersection(identities):
            return
        if identities not in self._refused and len(self._refused) < _MAX_LOGGED_REFUSALS:
            self._refused.add(identities)
            shown = ", ".join(i.decode(errors="replace") for i in identities) or "nothing"
            log.warning("tls: refused a client whose certificate names %s", shown)
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "client certificate not allowed")


class HttpTls:
    """``server.tls`` on the HTTP authorization port (the `lean` layout): the gRPC port's files,
    client CA and client names, for an asyncio server.

    The files are followed as on the gRPC port: each handshake asks ``CertificateFiles.fetch``
    (a ``stat`` until they change) from the context's SNI callback, and a set that checks out
    serves that handshake and every later one. Python calls the callback only when the client
    sends a server name: Envoy does (the cluster's ``sni``). The client names are checked once
    per connection (``admits``), as ``ClientNames`` checks each gRPC call.
    """

    def __init__(self, files: CertificateFiles, settings: TlsConfig) -> None:
        self._files = files
        self._settings = settings
        self._names = frozenset(settings.client_names)
        self._refused: set[tuple[str, ...]] = set()
        self._serving: ssl.SSLContext | None = None

    @classmethod
    def from_config(cls, config: Config) -> HttpTls | None:
        if not config.server.tls.enabled:
            return None
        return cls(CertificateFiles.from_config(config), config.server.tls)

    def context(self) -> ssl.SSLContext:
        """The server's context, from the files as they are; raises ConfigError as ``initial``."""
        self._files.initial()
        self._serving = self._build()
        listening = self._build()
        listening.sni_callback = self._on_hello
        return listening

    def _build(self) -> ssl.SSLContext:
        paths = self._files.paths
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(paths[CERT], paths[KEY], password=b"")
        if CLIENT_CA in paths:
            context.load_verify_locations(cafile=paths[CLIENT_CA])
        if self._settings.require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
        context.set_alpn_protocols(["http/1.1"])
        return context

    def _on_hello(self, connection: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        try:
            if self._files.fetch() is not None:  # the files changed and check out
                self._serving = self._build()
        except Exception as exc:  # never out of OpenSSL's callback: keep what is served
            log.warning("tls: keeping the certificate in use: %s", type(exc).__name__)
        if self._serving is not None:
            connection.context = self._serving

    def admits(self, peer: dict[str, Any] | None) -> bool:
        """Whether a connection's client certificate (``getpeercert()``) names a client name."""
        if not self._names:
            return True
        names = _cert_names(peer or {})
        if self._names.intersection(names):
            return True
        if names not in self._refused and len(self._refused) < _MAX_LOGGED_REFUSALS:
            self._refused.add(names)
            log.warning("tls: refused a client whose certificate names %s", ", ".join(names))
        return False


def _cert_names(peer: dict[str, Any]) -> tuple[str, ...]:
    """The subject alternative names (URI, DNS) of a certificate, else its common name, as grpc
    reports a peer's identities."""
    alternative = tuple(
        str(value) for kind, value in peer.get("subjectAltName", ()) if kind in ("URI", "DNS")
    )
    if alternative:
        return alternative
    return tuple(
        str(value) for rdn in peer.get("subject", ()) for key, value in rdn if key == "commonName"
    )
