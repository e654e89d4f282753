"""The one shared Kubernetes API client (in-cluster or kubeconfig) and the threads its calls run in.

The official ``kubernetes`` client is synchronous: every call runs in a small thread pool of its
own so the event loop never blocks. Identity, tier and access sources share one ``Kube``; each
``retain``s it and ``release``s it in its ``close``, and the last release closes the client.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import urllib3
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from extproc.config import Config
from extproc.errors import ConfigError, Unavailable

log = logging.getLogger("extproc.kube")

T = TypeVar("T")

CONNECT_TIMEOUT_S = 2.0
REQUEST_TIMEOUT_S = 5.0
DEFAULT_THREADS = 8


def load_configuration(kubeconfig: str) -> Any:
    """A ``kubernetes.client.Configuration``: from ``kubeconfig`` if set, else in-cluster."""
    configuration = client.Configuration()
    try:
        if kubeconfig:
            config.load_kube_config(
                config_file=kubeconfig,
                client_configuration=configuration,
                persist_config=False,
            )
        else:
            config.load_incluster_config(client_configuration=configuration)
    except (ConfigException, OSError, ValueError, yaml.YAMLError) as exc:
        if kubeconfig:
            raise ConfigError("identity.kubeconfig", f"a readable kubeconfig ({exc})") from exc
        expected = f"a kubeconfig path outside a pod (in-cluster config failed: {exc})"
        raise ConfigError("identity.kubeconfig", expected) from exc
    # Fail fast and let the caches and the failure policy decide; one retry covers a reset
    # connection from the pool.
    configuration.retries = 1
    return configuration


class Kube:
    """An ``ApiClient`` with the three APIs the sidecar uses, and the pool their calls run in."""

    def __init__(
        self,
        api_client: Any,
        *,
        threads: int = DEFAULT_THREADS,
        timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.api_client = api_client
        self.authentication = client.AuthenticationV1Api(api_client)
        self.authorization = client.AuthorizationV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.timeout = (CONNECT_TIMEOUT_S, timeout_s)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kube")
        self._lock = threading.Lock()
        self._users = 0
        self._closed = False
        self._healthy = True

    @classmethod
    def connect(cls, kubeconfig: str = "", *, threads: int = DEFAULT_THREADS) -> Kube:
        configuration = load_configuration(kubeconfig)
        configuration.connection_pool_maxsize = threads + 2  # + the ConfigMap watch
        return cls(client.ApiClient(configuration), threads=threads)

    def retain(self) -> Kube:
        """One more user; each must ``release`` once."""
        with self._lock:
            self._users += 1
        return self

    async def release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users <= 0
        if last:
            await self.close()

    async def call(self, fn: Callable[[], T], failure: type[Unavailable], what: str) -> T:
        """Run a blocking client call in the pool; any transport or API error raises ``failure``."""
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        except ApiException as exc:
            self.note_failure(what, f"HTTP {exc.status}")
            raise failure(f"{what}: the API server answered {exc.status}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            self.note_failure(what, type(exc).__name__)
            raise failure(f"{what}: the API server is unreachable ({type(exc).__name__})") from None
        except RuntimeError as exc:  # the pool is shut down: we are closing
            raise failure(f"{what}: the client is closed") from exc
        self.note_success()
        return result

    def note_failure(self, what: str, detail: str) -> None:
        """Log the first failure of a run of failures, not every one."""
        with self._lock:
            was, self._healthy = self._healthy, False
        if was:
            log.warning("kubernetes API call failed: %s (%s)", what, detail)

    def note_success(self) -> None:
        with self._lock:
            was, self._healthy = self._healthy, True
        if not was:
            log.info("kubernetes API answers again")

    async def close(self) -> None:
        """Idempotent: shut the pool down and close the client's connections."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        await asyncio.to_thread(self._shutdown)

    def _shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)  # calls in flight end within a timeout
        self.api_client.close()


class KubeConnector:
    """Builds the shared ``Kube`` on first need, so configs without Kubernetes sources never do."""

    def __init__(self, kubeconfig: str, *, threads: int = DEFAULT_THREADS) -> None:
        self._kubeconfig = kubeconfig
        self._threads = threads
        self._kube: Kube | None = None

    @classmethod
    def for_config(cls, settings: Config) -> KubeConnector:
        """``identity.kubeconfig``, resolved against the config file's folder like other paths."""
        kubeconfig = settings.identity.kubeconfig
        return cls(str(settings.path(kubeconfig)) if kubeconfig else "")

    def __call__(self) -> Kube:
        """The shared client, retained for the caller (who releases it in its ``close``)."""
        if self._kube is None:
            self._kube = Kube.connect(self._kubeconfig, threads=self._threads)
        return self._kube.retain()


def stop_watches(threads: list[threading.Thread], watches: list[Any], what: str) -> None:
    """Stop watch threads: ``Watch.stop`` shuts each open watch socket; it is repeated, since a
    thread may be opening a new watch just then. Blocking: run it off the event loop."""
    for _ in range(300):
        alive = [thread for thread in threads if thread.is_alive()]
        if not alive:
            return
        for stream in watches:
            stream.stop()
        for thread in alive:
            thread.join(0.05)
    log.warning("%s did not stop", what)


HTTP_GONE = 410


def run_list_watch(
    kube: Kube,
    stop: threading.Event,
    what: str,
    list_all: Callable[[], str | None],
    follow: Callable[[str | None], str | None],
    *,
    backoff_s: float,
    max_backoff_s: float,
    listed: Callable[[], None] = lambda: None,
) -> None:
    """An informer's loop, for a watch thread: list, then follow the watch from the list's
    resourceVersion until the server ends it, and again. 410 Gone lists again at once (the first
    time in a row); other failures wait a doubling backoff. ``listed`` runs after every list
    attempt, successful or not. It never raises: the last good state stays in force."""
    backoff = backoff_s
    version: str | None = None
    gone_in_a_row = 0
    while not stop.is_set():
        try:
            if version is None:
                try:
                    version = list_all()
                finally:
                    listed()
            version = follow(version)
            backoff, gone_in_a_row = backoff_s, 0
            continue
        except ApiException as exc:
            if stop.is_set():
                break
            version = None
            if exc.status == HTTP_GONE:
                gone_in_a_row += 1
                log.info("%s watch expired (410 Gone): listing again", what)
                if gone_in_a_row == 1:
                    continue
            else:
                kube.note_failure(f"{what} list/watch", f"HTTP {exc.status}")
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            if stop.is_set():
                break
            version = None
            kube.note_failure(f"{what} list/watch", type(exc).__name__)
        except Exception:  # the thread must outlive any surprise
            if stop.is_set():
                break
            version = None
            log.exception("%s watch failed unexpectedly", what)
        stop.wait(backoff)
        backoff = min(backoff * 2, max_backoff_s)
