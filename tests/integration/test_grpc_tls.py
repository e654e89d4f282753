"""The gRPC port under mTLS: who gets in, certificates rotated on disk, reflection and health ports."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from extproc.app import Server, Sidecar
from extproc.errors import ConfigError
from extproc.stack import free_port
from extproc.tls import CertificateFiles
from tests.helpers import KEYS, local_config
from tests.integration.test_grpc_services import check_request
from tests.tls_fixtures import KeyPair, Pki

GATEWAY = "spiffe://cluster.local/ns/openshift-ingress/sa/maas-default-gateway-openshift-default"
SERVING = health_pb2.HealthCheckResponse.SERVING
# Each channel gets subchannels of its own: a new connection every time (rotation is seen by new
# connections), never one another test left to a port a stopped server held before this one.
FRESH = [("grpc.use_local_subchannel_pool", 1)]


@dataclass
class Certs:
    ca: KeyPair
    server: KeyPair
    client: KeyPair


def make_certs(pki: Pki, prefix: str, client_sans: tuple[str, ...] = (f"URI:{GATEWAY}",)) -> Certs:
    ca = pki.ca(f"{prefix}-ca")
    server = pki.issue(ca, f"{prefix}-server", ["DNS:localhost", "IP:127.0.0.1"], "serverAuth")
    client = pki.issue(ca, f"{prefix}-client", client_sans, "clientAuth")
    return Certs(ca, server, client)


class SecretVolume:
    """Files laid out as the kubelet writes a Secret volume: each name links to ``..data/name``,
    and an update swaps the ``..data`` link in one rename (kubernetes AtomicWriter)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self._version = 0

    def write(self, files: Mapping[str, Path]) -> None:
        self._version += 1
        version = self.root / f"..v{self._version}"
        version.mkdir()
        for name, source in files.items():
            (version / name).write_bytes(source.read_bytes())
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(Path("..data") / name)
        staged = self.root / "..data_tmp"
        staged.symlink_to(version.name)
        os.replace(staged, self.root / "..data")

    def path(self, name: str) -> str:
        return str(self.root / name)


def mounted(volume: SecretVolume, certs: Certs) -> None:
    volume.write(
        {"tls.crt": certs.server.cert, "tls.key": certs.server.key, "ca.crt": certs.ca.cert}
    )


def tls_env(volume: SecretVolume, **extra: str) -> dict[str, str]:
    return {
        "MAAS_EXTPROC_SERVER_TLS_CERT_FILE": volume.path("tls.crt"),
        "MAAS_EXTPROC_SERVER_TLS_KEY_FILE": volume.path("tls.key"),
        "MAAS_EXTPROC_SERVER_TLS_CLIENT_CA_FILE": volume.path("ca.crt"),
        **extra,
    }


async def serving(environ: dict[str, str]) -> Server:
    server = Server(Sidecar.build(local_config(environ)), "127.0.0.1", 0)
    await server.start()
    return server


def channel(server: Server, trust: Certs, client: KeyPair | None) -> grpc.aio.Channel:
    """A TLS channel to ``server`` trusting ``trust``'s CA, presenting ``client`` if given."""
    credentials = grpc.ssl_channel_credentials(
        trust.ca.cert.read_bytes(),
        client.key.read_bytes() if client else None,
        client.cert.read_bytes() if client else None,
    )
    options = [*FRESH, ("grpc.ssl_target_name_override", "localhost")]
    return grpc.aio.secure_channel(f"127.0.0.1:{server.port}", credentials, options)


def plaintext(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", FRESH)


async def health_check(chan: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(reply.status)


async def refused(chan: grpc.aio.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health_check(chan)
    await chan.close()
    return caught.value.code()


def served_certificate(port: int, certs: Certs) -> bytes:
    """The DER certificate a new TLS connection to ``port`` is served, presenting ``certs.client``."""
    context = ssl.create_default_context(cafile=str(certs.ca.cert))
    context.load_cert_chain(str(certs.client.cert), str(certs.client.key))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


@pytest.fixture
async def mtls(pki: Pki, tmp_path: Path) -> AsyncIterator[tuple[Server, Certs, SecretVolume]]:
    certs = make_certs(pki, "one")
    volume = SecretVolume(tmp_path / "tls")
    mounted(volume, certs)
    server = await serving(tls_env(volume))
    yield server, certs, volume
    await server.stop(0)


async def test_only_a_client_with_a_certificate_from_the_configured_ca_gets_in(
    mtls: tuple[Server, Certs, SecretVolume], pki: Pki
) -> None:
    server, certs, _ = mtls
    async with channel(server, certs, certs.client) as chan:
        assert await health_check(chan) == SERVING
        allowed = await authz_grpc.AuthorizationStub(chan).Check(check_request(KEYS["premium"]))
        assert allowed.status.code == 0
    # No certificate, one from another CA, or no TLS at all: the handshake fails, no call is made.
    assert await refused(channel(server, certs, None)) == grpc.StatusCode.UNAVAILABLE
    rogue = make_certs(pki, "rogue")
    assert await refused(channel(server, certs, rogue.client)) == grpc.StatusCode.UNAVAILABLE
    plain = plaintext(server.port)
    assert await refused(plain) == grpc.StatusCode.UNAVAILABLE


async def test_rotated_files_are_served_to_the_next_connection(
    mtls: tuple[Server, Certs, SecretVolume], pki: Pki
) -> None:
    server, old, volume = mtls
    first = await asyncio.to_thread(served_certificate, server.port, old)
    assert first == der(old.server.cert)
    new = make_certs(pki, "two")
    mounted(volume, new)  # a new CA too: old clients must now be refused
    second = await asyncio.to_thread(served_certificate, server.port, new)
    assert second == der(new.server.cert)
    async with channel(server, new, new.client) as chan:
        assert await health_check(chan) == SERVING
    assert await refused(channel(server, old, old.client)) == grpc.StatusCode.UNAVAILABLE


async def test_a_broken_rotation_keeps_the_certificate_in_use_and_says_so_once(
    mtls: tuple[Server, Certs, SecretVolume], pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    server, certs, volume = mtls
    other = make_certs(pki, "other")
    # A key that does not belong to the certificate: grpc must never be handed that pair.
    volume.write(
        {"tls.crt": certs.server.cert, "tls.key": other.server.key, "ca.crt": certs.ca.cert}
    )
    with caplog.at_level(logging.WARNING, logger="extproc.tls"):
        for _ in range(3):
            async with channel(server, certs, certs.client) as chan:
                assert await health_check(chan) == SERVING
    warnings = [r.getMessage() for r in caplog.records if r.name == "extproc.tls"]
    assert len(warnings) == 1, warnings
    assert "keeping the certificate in use" in warnings[0]
    assert "server.tls.key_file" in warnings[0]
    assert not [r for r in caplog.records if r.exc_info]


async def test_client_names_narrow_the_ca_to_the_named_client(pki: Pki, tmp_path: Path) -> None:
    certs = make_certs(pki, "mesh")
    stranger = pki.issue(
        certs.ca, "stranger", ["URI:spiffe://cluster.local/ns/team/sa/app"], "clientAuth"
    )
    volume = SecretVolume(tmp_path / "tls")
    mounted(volume, certs)
    server = await serving(tls_env(volume, MAAS_EXTPROC_SERVER_TLS_CLIENT_NAMES=GATEWAY))
    try:
        async with channel(server, certs, certs.client) as chan:
            assert await health_check(chan) == SERVING
            allowed = await authz_grpc.AuthorizationStub(chan).Check(check_request(KEYS["free"]))
            assert allowed.status.code == 0
        # Same CA, another workload: the handshake passes, every method is refused.
        async with channel(server, certs, stranger) as chan:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await authz_grpc.AuthorizationStub(chan).Check(check_request(KEYS["free"]))
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert await refused(channel(server, certs, stranger)) == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await server.stop(0)


async def test_health_port_answers_in_plain_text_while_the_grpc_port_wants_mtls(
    mtls: tuple[Server, Certs, SecretVolume], tmp_path: Path
) -> None:
    _, certs, _ = mtls
    volume = SecretVolume(tmp_path / "second")
    mounted(volume, certs)
    health_port = free_port()
    server = await serving(tls_env(volume, MAAS_EXTPROC_SERVER_HEALTH_PORT=str(health_port)))
    try:
        async with plaintext(health_port) as chan:
            assert await health_check(chan) == SERVING
            # Only health there: the sidecar's own services are not reachable without mTLS.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await authz_grpc.AuthorizationStub(chan).Check(check_request(KEYS["free"]))
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(0)


async def test_reflection_can_be_turned_off() -> None:
    server = await serving({"MAAS_EXTPROC_SERVER_REFLECTION": "false"})
    try:
        async with plaintext(server.port) as chan:
            call = reflection_pb2_grpc.ServerReflectionStub(chan).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                [reply async for reply in call]
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert await health_check(chan) == SERVING
    finally:
        await server.stop(0)


def test_unusable_files_stop_the_start_naming_the_key(pki: Pki, tmp_path: Path) -> None:
    certs = make_certs(pki, "start")
    other = make_certs(pki, "stranger")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        (CertificateFiles(tmp_path / "missing.crt", certs.server.key), "server.tls.cert_file"),
        (CertificateFiles(garbage, certs.server.key), "server.tls.cert_file"),
        (CertificateFiles(certs.server.cert, other.server.key), "server.tls.key_file"),
        (
            CertificateFiles(certs.server.cert, certs.server.key, garbage),
            "server.tls.client_ca_file",
        ),
    ]
    for files, key in cases:
        with pytest.raises(ConfigError) as caught:
            files.initial()
        assert caught.value.key == key
