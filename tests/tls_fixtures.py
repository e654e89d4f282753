"""Throwaway certificate authorities and certificates for the TLS tests, made with the openssl CLI."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.tools import require_tool


def openssl_binary() -> str:
    """openssl from PATH; missing, the test is skipped, or fails under CI (``.ci/run`` installs it)."""
    return require_tool(
        "openssl", "openssl not installed: cannot make certificates for the TLS tests"
    )


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


class Pki:
    """Makes P-256 CAs and the certificates they sign, one day valid, under ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.openssl = openssl_binary()
        self._serial = 0

    def _run(self, *args: str) -> None:
        subprocess.run(
            [self.openssl, *args], capture_output=True, timeout=30, check=True, cwd=self.workdir
        )

    def _paths(self, name: str) -> KeyPair:
        return KeyPair(self.workdir / f"{name}.crt", self.workdir / f"{name}.key")

    def ca(self, name: str) -> KeyPair:
        out = self._paths(name)
        self._run(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-days", "1", "-subj", f"/CN={name}", "-keyout", str(out.key), "-out", str(out.cert),
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        return out

    def issue(self, ca: KeyPair, name: str, sans: Sequence[str], usage: str) -> KeyPair:
        """A leaf for ``sans`` (``DNS:localhost``, ``URI:spiffe://…``) with extended key usage
        ``serverAuth`` or ``clientAuth``."""
        out = self._paths(name)
        csr, ext = self.workdir / f"{name}.csr", self.workdir / f"{name}.ext"
        ext.write_text(
            f"subjectAltName={','.join(sans)}\nextendedKeyUsage={usage}\n"
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        )
        self._serial += 1
        self._run(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-subj", f"/CN={name}", "-keyout", str(out.key), "-out", str(csr),
        )  # fmt: skip
        self._run(
            "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
            "-set_serial", str(self._serial), "-days", "1", "-extfile", str(ext),
            "-out", str(out.cert),
        )  # fmt: skip
        return out


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)
