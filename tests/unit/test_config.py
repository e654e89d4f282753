"""Config loading: defaults, the sample file, environment overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from extproc.__main__ import main
from extproc.config import Config, Secret, load, parse
from extproc.errors import ConfigError
from tests.helpers import LOCAL, local_config
from tests.tls_fixtures import Pki


def test_sample_config_loads_with_the_contract_defaults() -> None:
    config = local_config()
    assert config.server.port == 9000
    assert config.identity.source == "api_keys"
    free = config.limits.tiers["free"]
    assert (free.requests, free.requests_window_s, free.tokens, free.tokens_window_s) == (
        5,
        120,
        100,
        60,
    )
    assert config.limits.tiers["enterprise"].tokens == 100_000
    assert config.path(config.tiers.file) == LOCAL / "tiers.yaml"


def test_environment_overrides_scalars() -> None:
    config = local_config(
        {"MAAS_EXTPROC_STORE_URL": "redis://127.0.0.1:6390/0", "MAAS_EXTPROC_SERVER_WORKERS": "3"}
    )
    assert str(config.store.url) == "redis://127.0.0.1:6390/0"
    assert config.server.workers == 3


def test_unknown_environment_setting_is_an_error() -> None:
    with pytest.raises(ConfigError, match="MAAS_EXTPROC_STORE_URLL"):
        local_config({"MAAS_EXTPROC_STORE_URLL": "x"})


@pytest.mark.parametrize(
    ("raw", "key", "expected"),
    [
        ({"server": {"port": "nine"}}, "server.port", "whole number"),
        ({"server": {"prot": 1}}, "server.prot", "one of"),
        ({"store": {"failure_policy": "maybe"}}, "store.failure_policy", "fail_open"),
        ({"limits": {"tiers": {"free": {"tokens": -1}}}}, "limits.tiers.free.tokens", ">= 0"),
        ({"limits": {"tiers": {"free": {"tokens_window": "soon"}}}}, "tokens_window", "like"),
        ({"limits": {"window": "rolling"}}, "limits.window", "fixed or sliding"),
        ({"store": {"url": "postgres://x"}}, "store.url", "redis://"),
        ({"server": {"grace_period_s": "10 minutes"}}, "server.grace_period_s", "duration"),
        ({"access": {"body_models": {"m": "nope"}}}, "access.body_models.m", "<namespace>/<name>"),
        ({"limits": {"max_request_tokens": 0}}, "limits.max_request_tokens", "from 1 to"),
        ({"limits": {"max_request_tokens": 2**60}}, "limits.max_request_tokens", "from 1 to"),
        ({"limits": {"max_request_tokens": "1e6"}}, "limits.max_request_tokens", "whole number"),
        (
            {"limits": {"max_request_tokens": 100, "default_reservation_tokens": 101}},
            "limits.default_reservation_tokens",
            "from 0 to limits.max_request_tokens (100)",
        ),
        (
            {
                "limits": {
                    "max_request_tokens": 100,
                    "default_reservation_tokens": 10,
                    "reservation_tokens": {"free": 500},
                }
            },
            "limits.reservation_tokens.free",
            "limits.max_request_tokens",
        ),
        (
            {"accounting": {"max_decompression_ratio": 0}},
            "accounting.max_decompression_ratio",
            ">= 1",
        ),
    ],
)
def test_errors_name_the_key_and_what_was_expected(
    raw: dict[str, object], key: str, expected: str
) -> None:
    raw = {"identity": {"api_keys_file": "k"}, "tiers": {"file": "t"}, **raw}
    with pytest.raises(ConfigError) as caught:
        parse(raw)
    assert key in str(caught.value)
    assert expected in str(caught.value)


def test_max_request_tokens_default_and_override() -> None:
    assert local_config().limits.max_request_tokens == 1_000_000
    config = local_config({"MAAS_EXTPROC_LIMITS_MAX_REQUEST_TOKENS": "200000"})
    assert config.limits.max_request_tokens == 200_000


def test_files_are_required_for_file_sources() -> None:
    with pytest.raises(ConfigError, match=r"identity\.api_keys_file"):
        parse({})


def test_durations_accept_units() -> None:
    config = parse(
        {
            "identity": {"api_keys_file": "k", "cache_ttl_s": "2m"},
            "tiers": {"file": "t"},
            "store": {"timeout_s": "250ms"},
            "limits": {"tiers": {"free": {"tokens_window": "1h"}}},
        }
    )
    assert config.identity.cache_ttl_s == 120.0
    assert config.store.timeout_s == 0.25
    assert config.limits.tiers["free"].tokens_window_s == 3600
    assert config.limits.tiers["free"].tokens == 100  # untouched fields keep the defaults


def test_redis_password_never_shows_in_repr() -> None:
    config = parse(
        {
            "identity": {"api_keys_file": "k"},
            "tiers": {"file": "t"},
            "store": {"url": "rediss://user:hunter2@redis.example:6380/0"},
        }
    )
    assert "hunter2" not in repr(config)
    assert "hunter2" not in repr(config.store)
    assert "***@redis.example:6380" in repr(config.store.url)
    assert str(config.store.url) == "rediss://user:hunter2@redis.example:6380/0"
    assert isinstance(config.store.url, Secret)


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.server = config.server  # type: ignore[misc]


def test_check_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(LOCAL / "config.yaml")]) == 0
    assert "ok" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  port: 70000\nidentity: {api_keys_file: k}\ntiers: {file: t}\n")
    assert main(["check-config", str(bad)]) == 2
    assert "server.port" in capsys.readouterr().err


def test_check_config_reads_the_tls_files(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = pki.ca("ca")
    server = pki.issue(ca, "server", ["DNS:localhost"], "serverAuth")
    stranger = pki.issue(ca, "stranger", ["DNS:localhost"], "serverAuth")
    path = tmp_path / "config.yaml"
    tls = {"cert_file": server.cert.name, "key_file": server.key.name, "client_ca_file": "ca.crt"}
    files = {  # check-config reads these too
        "identity": {"api_keys_file": str(LOCAL / "api-keys.yaml")},
        "tiers": {"file": str(LOCAL / "tiers.yaml")},
    }
    path.write_text(yaml.safe_dump({**files, "server": {"tls": tls}}))
    assert main(["check-config", str(path)]) == 0
    capsys.readouterr()
    path.write_text(
        yaml.safe_dump({**files, "server": {"tls": {**tls, "key_file": stranger.key.name}}})
    )
    assert main(["check-config", str(path)]) == 2
    assert (
        "server.tls.key_file: expected the unencrypted PEM private key" in capsys.readouterr().err
    )


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="readable"):
        load(tmp_path / "absent.yaml", {})


def test_observability_section_defaults_and_overrides() -> None:
    config = local_config()
    assert config.observability.per_user_metrics is False
    assert config.observability.usage_port == 8081
    assert config.observability.admin_group == "maas-admins"
    environ = {
        "MAAS_EXTPROC_OBSERVABILITY_PER_USER_METRICS": "true",
        "MAAS_EXTPROC_OBSERVABILITY_USAGE_PORT": "0",
    }
    overridden = local_config(environ)
    assert overridden.observability.per_user_metrics is True
    assert overridden.observability.usage_port == 0
    with pytest.raises(ConfigError, match=r"^observability\.usage_port: expected a port"):
        local_config({"MAAS_EXTPROC_OBSERVABILITY_USAGE_PORT": "70000"})
    with pytest.raises(ConfigError, match=r"^observability\.per_user_metrics: expected true"):
        local_config({"MAAS_EXTPROC_OBSERVABILITY_PER_USER_METRICS": "yes please"})


def test_only_worker_zero_serves_the_usage_api() -> None:
    from extproc.app import worker_config

    config = local_config()
    assert worker_config(config, 0).observability.usage_port == 8081
    assert worker_config(config, 1).observability.usage_port == 0


def test_tls_is_off_by_default_and_reflection_on() -> None:
    server = local_config().server
    assert server.tls.enabled is False
    assert server.reflection is True
    assert server.health_port == 0


def test_tls_settings_from_the_environment() -> None:
    config = local_config(
        {
            "MAAS_EXTPROC_SERVER_TLS_CERT_FILE": "tls/tls.crt",
            "MAAS_EXTPROC_SERVER_TLS_KEY_FILE": "tls/tls.key",
            "MAAS_EXTPROC_SERVER_TLS_CLIENT_CA_FILE": "/etc/ca/root-cert.pem",
            "MAAS_EXTPROC_SERVER_TLS_CLIENT_NAMES": "spiffe://cluster.local/ns/a/sa/b",
            "MAAS_EXTPROC_SERVER_REFLECTION": "false",
            "MAAS_EXTPROC_SERVER_HEALTH_PORT": "9001",
        }
    )
    tls = config.server.tls
    assert tls.enabled is True
    assert tls.require_client_cert is True  # follows client_ca_file
    assert tls.client_names == ("spiffe://cluster.local/ns/a/sa/b",)
    assert config.path(tls.cert_file) == LOCAL / "tls" / "tls.crt"  # relative to the config file
    assert config.server.reflection is False
    assert config.server.health_port == 9001
    without_ca = parse({**FILES, "server": {"tls": {"cert_file": "c", "key_file": "k"}}})
    assert without_ca.server.tls.require_client_cert is False


FILES = {"identity": {"api_keys_file": "k"}, "tiers": {"file": "t"}}


@pytest.mark.parametrize(
    ("tls", "key", "expected"),
    [
        ({"cert_file": "c"}, "server.tls.key_file", "a key file"),
        ({"key_file": "k"}, "server.tls.cert_file", "a certificate file"),
        ({"client_ca_file": "ca"}, "server.tls.cert_file", "client_ca_file is set"),
        (
            {"cert_file": "c", "key_file": "k", "require_client_cert": True},
            "server.tls.require_client_cert",
            "false unless server.tls.client_ca_file",
        ),
        (
            {
                "cert_file": "c",
                "key_file": "k",
                "client_ca_file": "ca",
                "require_client_cert": False,
            },
            "server.tls.require_client_cert",
            "true when server.tls.client_ca_file is set",
        ),
        (
            {"cert_file": "c", "key_file": "k", "client_names": ["spiffe://x"]},
            "server.tls.client_names",
            "empty unless",
        ),
        (
            {"cert_file": "c", "key_file": "k", "require_client_cert": "yes"},
            "server.tls.require_client_cert",
            "true or false",
        ),
        ({"cert": "c"}, "server.tls.cert", "one of"),
        ({"cert_file": 3}, "server.tls.cert_file", "a string"),
    ],
)
def test_tls_errors_name_the_key(tls: dict[str, object], key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse({**FILES, "server": {"tls": tls}})
    assert str(caught.value).startswith(key)
    assert expected in str(caught.value)


def test_health_port_must_be_another_port() -> None:
    with pytest.raises(ConfigError, match=r"^server\.health_port"):
        parse({**FILES, "server": {"port": 9000, "health_port": 9000}})
    from extproc.app import worker_config

    config = parse({**FILES, "server": {"health_port": 9100, "workers": 2}})
    assert worker_config(config, 1).server.health_port == 9101


def test_the_subscription_era_defaults_and_its_settings() -> None:
    config = parse(
        {"maas": {"era": "subscriptions"}, "identity": {"source": "maas_api_keys"}}, serving=False
    )
    assert config.maas.era == "subscriptions"
    assert config.subscriptions.selection == "watch"
    assert config.subscriptions.namespace == "models-as-a-service"
    assert config.subscriptions.api_key_cache_ttl_s == 60.0
    assert config.identity.tokens == "kubernetes"
    assert parse({}, serving=False).maas.era == "tiers"  # the tier era stays the default


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"identity": {"source": "maas_api_keys"}}, "identity.source"),
        (
            {"maas": {"era": "subscriptions"}, "access": {"check": "subject_access_review"}},
            "access.check",
        ),
        (
            {"maas": {"era": "subscriptions"}, "access": {"body_models": {"m": "ns/m"}}},
            "access.body_models",
        ),
        (
            {
                "maas": {"era": "subscriptions"},
                "subscriptions": {"maas_api_url": "http://x", "maas_api_ca_file": "ca.pem"},
            },
            "subscriptions.maas_api_ca_file",
        ),
        (
            {"maas": {"era": "subscriptions"}, "subscriptions": {"namespace": ""}},
            "subscriptions.namespace",
        ),
        ({"maas": {"era": "leases"}}, "maas.era"),
        (
            {
                "maas": {"era": "subscriptions"},
                "identity": {"source": "maas_api_keys", "tokens": "api_keys"},
            },
            "identity.api_keys_file",
        ),
    ],
)
def test_the_subscription_era_refuses_what_it_replaced(raw: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse(raw, serving=key == "identity.api_keys_file")  # files are checked when serving
    assert refused.value.key == key


def test_the_local_subscription_config_is_valid() -> None:
    loaded = load(LOCAL / "subscriptions" / "config.yaml", {})
    assert (loaded.maas.era, loaded.identity.source, loaded.subscriptions.selection) == (
        "subscriptions",
        "maas_api_keys",
        "maas_api",
    )
