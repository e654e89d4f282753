"""Loads every file a config names with the loaders `serve` uses, so check-config fails where serve would.

``load`` only validates the config's own keys; the files they name (the gRPC port's certificates,
API keys, tiers, maas-api's CA bundle, kubeconfig, the store's TLS files) are read when the
sidecar starts. ``check`` reads each of them now, the same way, and raises a ``ConfigError``
naming the key; nothing connects.
"""

from __future__ import annotations

import asyncio
import ssl
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from extproc.authz.api_keys import ApiKeyIdentities
from extproc.authz.kube import load_configuration
from extproc.authz.maas_api_tiers import client_tls
from extproc.authz.tiers import FileTiers
from extproc.config import Config, redact_url
from extproc.errors import ConfigError, StoreUnavailable

# redis-py options in a rediss:// query string that name files (read by redis-py at connect).
_STORE_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def check(config: Config) -> list[str]:
    """Read every file ``config`` names; returns ``key=path`` for each, raises ConfigError."""
    checked: list[str] = []

    def load(key: str, path: Path, loader: Callable[[Path], object]) -> None:
        try:
            loader(path)
        except ConfigError as exc:
            raise ConfigError(key, f"a valid file ({exc})") from exc
        except (OSError, ValueError, ssl.SSLError) as exc:
            raise ConfigError(key, f"a valid file ({path}: {exc})") from exc
        checked.append(f"{key}={path}")

    if config.server.tls.enabled:
        from extproc.tls import CertificateFiles

        CertificateFiles.from_config(config).load()  # its ConfigError names the file's key
        tls = config.server.tls
        for key, value in (
            ("server.tls.cert_file", tls.cert_file),
            ("server.tls.key_file", tls.key_file),
            ("server.tls.client_ca_file", tls.client_ca_file),
        ):
            if value:
                checked.append(f"{key}={config.path(value)}")
    identity = config.identity
    subscriptions = config.maas.era == "subscriptions"
    if identity.source == "api_keys" or (
        identity.source == "maas_api_keys" and identity.tokens == "api_keys"
    ):
        load(
            "identity.api_keys_file",
            config.path(config.identity.api_keys_file),
            ApiKeyIdentities.from_file,
        )
    if not subscriptions and config.tiers.source == "file":
        load(
            "tiers.file",
            config.path(config.tiers.file),
            lambda path: FileTiers.from_file(path, config.tiers.instance),
        )
    if not subscriptions and config.tiers.source == "maas_api" and config.tiers.maas_api_ca_file:
        load(
            "tiers.maas_api_ca_file",
            config.path(config.tiers.maas_api_ca_file),
            client_tls,
        )
    if subscriptions and config.subscriptions.maas_api_ca_file:
        load(
            "subscriptions.maas_api_ca_file",
            config.path(config.subscriptions.maas_api_ca_file),
            client_tls,
        )
    if config.identity.kubeconfig and _uses_kubernetes(config):
        load(
            "identity.kubeconfig",
            config.path(config.identity.kubeconfig),
            lambda path: load_configuration(str(path)),
        )
    _check_store(config, load)
    return checked


def _uses_kubernetes(config: Config) -> bool:
    """The sources that make `serve` build a Kubernetes client (KubeConnector)."""
    subscriptions = config.maas.era == "subscriptions"
    return (
        config.identity.source == "kubernetes"
        or (config.identity.source == "maas_api_keys" and config.identity.tokens == "kubernetes")
        or (subscriptions and config.subscriptions.selection == "watch")
        or (not subscriptions and config.tiers.source == "configmap")
        or config.access.check == "subject_access_review"
        or config.kuadrant.policies == "watch"
    )


def _check_store(
    config: Config, load: Callable[[str, Path, Callable[[Path], object]], None]
) -> None:
    url = str(config.store.url)
    if url.startswith("memory:"):
        return
    from extproc.store.redis import RedisStore

    try:  # builds the client as serve does; redis-py connects only on the first command
        store = RedisStore.from_config(config.store)
    except StoreUnavailable as exc:
        raise ConfigError("store.url", f"a usable store URL ({exc})", redact_url(url)) from exc
    asyncio.run(store.close())
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    certfile = (query.get("ssl_certfile") or [""])[0]
    keyfile = (query.get("ssl_keyfile") or [""])[0]
    for option in _STORE_TLS_FILES:
        for value in query.get(option, []):
            if option == "ssl_ca_certs":
                load(f"store.url {option}", Path(value), _load_ca_bundle)
            elif option == "ssl_certfile":
                load(f"store.url {option}", Path(value), lambda p: _load_cert(p, keyfile))
            elif not certfile:
                raise ConfigError(f"store.url {option}", "ssl_certfile next to ssl_keyfile")


def _load_ca_bundle(path: Path) -> None:
    ssl.create_default_context(cafile=str(path))


def _load_cert(certfile: Path, keyfile: str) -> None:
    ssl.create_default_context().load_cert_chain(str(certfile), keyfile or None)
