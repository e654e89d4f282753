"""Fixtures the Kubernetes-facing integration tests share; each module brings its own emulator."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from extproc.authz.kube import Kube
from extproc.observability.metrics import Metrics
from tests.k8s_emulator import KubeEmulator


@pytest.fixture
async def kube(emulator: KubeEmulator) -> AsyncIterator[Kube]:
    """The real kubernetes client, reaching the module's emulator through its kubeconfig."""
    client = Kube.connect(str(emulator.write_kubeconfig()))
    yield client
    await client.close()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()
