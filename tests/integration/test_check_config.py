"""`maas-extproc check-config` as a process: every file the config names is read, as `serve` reads it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import LOCAL
from tests.redis_fixtures import free_port, self_signed_cert

GARBAGE = "}{ not: [yaml\n\x07"


def run(command: str, config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_EXTPROC_")}
    environ.update(env)
    flag = ["--config"] if command == "serve" else []
    return subprocess.run(
        [sys.executable, "-m", "extproc", command, *flag, str(config)],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
        check=False,
    )


def local_config(folder: Path, **sections: dict[str, object]) -> Path:
    """deploy/local/config.yaml with absolute file paths and ``sections`` merged in."""
    raw = yaml.safe_load((LOCAL / "config.yaml").read_text())
    raw["identity"]["api_keys_file"] = str(LOCAL / "api-keys.yaml")
    raw["tiers"]["file"] = str(LOCAL / "tiers.yaml")
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def written(folder: Path, name: str, content: str | bytes) -> str:
    path = folder / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def test_a_good_config_is_ok_and_lists_the_files_it_read(tmp_path: Path) -> None:
    done = run("check-config", local_config(tmp_path))
    assert done.returncode == 0, done.stderr
    assert f"read identity.api_keys_file={LOCAL / 'api-keys.yaml'}" in done.stdout
    assert f"read tiers.file={LOCAL / 'tiers.yaml'}" in done.stdout


BAD_FILES = [
    ("identity.api_keys_file", {"identity": {"api_keys_file": "absent.yaml"}}),
    ("identity.api_keys_file", {"identity": {"api_keys_file": "@garbage"}}),
    ("identity.api_keys_file", {"identity": {"api_keys_file": "@keys-not-a-list"}}),
    ("tiers.file", {"tiers": {"file": "absent.yaml"}}),
    ("tiers.file", {"tiers": {"file": "@garbage"}}),
    ("tiers.file", {"tiers": {"file": "@not-utf8"}}),
    ("tiers.file", {"tiers": {"file": "@tier-without-name"}}),
]
CONTENTS: dict[str, str | bytes] = {
    "garbage": GARBAGE,
    "keys-not-a-list": "keys: alice\n",
    "not-utf8": b"tiers:\n- name: \xff\xfe\n",
    "tier-without-name": "- {level: 1, groups: [a]}\n",
}


def materialize(
    folder: Path, sections: dict[str, dict[str, object]]
) -> dict[str, dict[str, object]]:
    """``@name`` values become files holding CONTENTS[name]; other values stay (relative: absent)."""
    out: dict[str, dict[str, object]] = {}
    for section, values in sections.items():
        out[section] = {}
        for key, value in values.items():
            if isinstance(value, str) and value.startswith("@"):
                value = written(folder, value[1:], CONTENTS[value[1:]])
            out[section][key] = value
    return out


@pytest.mark.parametrize(("key", "sections"), BAD_FILES)
def test_check_config_fails_where_serve_fails(
    tmp_path: Path, key: str, sections: dict[str, dict[str, object]]
) -> None:
    config = local_config(tmp_path, **materialize(tmp_path, sections))
    checked = run("check-config", config)
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert f"config error: {key}" in checked.stderr
    assert "Traceback" not in checked.stderr
    ports = {
        "MAAS_EXTPROC_SERVER_PORT": str(free_port()),
        "MAAS_EXTPROC_SERVER_METRICS_PORT": "0",
        "MAAS_EXTPROC_OBSERVABILITY_USAGE_PORT": "0",
    }
    served = run("serve", config, **ports)  # serve refuses the same file at start
    assert served.returncode == 2, served.stdout + served.stderr


def test_a_garbage_kubeconfig_is_refused(tmp_path: Path) -> None:
    kubeconfig = written(tmp_path, "kubeconfig", GARBAGE)
    config = local_config(tmp_path, identity={"source": "kubernetes", "kubeconfig": kubeconfig})
    done = run("check-config", config)
    assert done.returncode == 2, done.stdout
    assert "config error: identity.kubeconfig" in done.stderr


def test_a_garbage_maas_api_ca_bundle_is_refused(tmp_path: Path) -> None:
    tiers = {
        "source": "maas_api",
        "maas_api_url": "https://maas-api.example:8443",
        "maas_api_ca_file": written(tmp_path, "ca.pem", GARBAGE),
    }
    done = run("check-config", local_config(tmp_path, tiers=tiers))
    assert done.returncode == 2, done.stdout
    assert "config error: tiers.maas_api_ca_file" in done.stderr
    cert, _ = self_signed_cert(tmp_path)
    ok = run("check-config", local_config(tmp_path, tiers={**tiers, "maas_api_ca_file": str(cert)}))
    assert ok.returncode == 0, ok.stderr


def test_store_tls_files_are_read(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    garbage = written(tmp_path, "ca.pem", GARBAGE)
    good = f"rediss://127.0.0.1:6380/0?ssl_ca_certs={cert}&ssl_certfile={cert}&ssl_keyfile={key}"
    ok = run("check-config", local_config(tmp_path, store={"url": good}))
    assert ok.returncode == 0, ok.stderr
    assert f"read store.url ssl_ca_certs={cert}" in ok.stdout
    for bad in (
        f"rediss://127.0.0.1:6380/0?ssl_ca_certs={garbage}",
        f"rediss://127.0.0.1:6380/0?ssl_ca_certs={tmp_path / 'absent.pem'}",
        f"rediss://127.0.0.1:6380/0?ssl_certfile={garbage}",
        f"rediss://127.0.0.1:6380/0?ssl_keyfile={key}",
        "redis://127.0.0.1:not-a-port/0",
    ):
        done = run("check-config", local_config(tmp_path, store={"url": bad}))
        assert done.returncode == 2, bad
        assert "config error: store.url" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
