"""telemetry: the OTLP settings, each bad value named by its key, headers never shown."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.config import load, parse
from extproc.errors import ConfigError


def telemetry(raw: dict[str, Any]) -> Any:
    return parse({"telemetry": raw}, serving=False).telemetry


def test_off_by_default_and_a_full_example() -> None:
    assert telemetry({}).otlp.endpoint == ""
    config = telemetry(
        {
            "otlp": {
                "endpoint": "https://collector:4317",
                "protocol": "grpc",
                "interval_s": "15s",
                "timeout_s": "2s",
                "headers": {"authorization": "Bearer s3cret"},
            },
            "service_name": "maas-extproc-eu",
            "resource_attributes": {"deployment.environment.name": "prod"},
        }
    )
    assert (config.otlp.protocol, config.otlp.interval_s, config.otlp.timeout_s) == ("grpc", 15, 2)
    assert dict(config.otlp.headers) == {"authorization": "Bearer s3cret"}
    assert "s3cret" not in repr(config)
    assert config.resource_attributes == (("deployment.environment.name", "prod"),)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"otlp": {"endpoint": "collector:4318"}}, "telemetry.otlp.endpoint"),
        ({"otlp": {"endpoint": "ftp://collector"}}, "telemetry.otlp.endpoint"),
        ({"otlp": {"endpoint": "http://c:4317/v1", "protocol": "grpc"}}, "telemetry.otlp.endpoint"),
        ({"otlp": {"protocol": "udp"}}, "telemetry.otlp.protocol"),
        ({"otlp": {"interval_s": 0}}, "telemetry.otlp.interval_s"),
        ({"otlp": {"timeout_s": "soon"}}, "telemetry.otlp.timeout_s"),
        ({"otlp": {"headers": {"x": 1}}}, "telemetry.otlp.headers.x"),
        ({"otlp": {"headers": ["x"]}}, "telemetry.otlp.headers"),
        ({"otlp": {"bogus": 1}}, "telemetry.otlp.bogus"),
        ({"service_name": ""}, "telemetry.service_name"),
        ({"resource_attributes": {"a": None}}, "telemetry.resource_attributes.a"),
        ({"otlp": "http://c"}, "telemetry.otlp"),
    ],
)
def test_bad_values_name_their_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        telemetry(raw)
    assert str(caught.value).startswith(key + ":"), str(caught.value)


def test_the_environment_sets_the_scalars() -> None:
    environ = {
        "MAAS_EXTPROC_TELEMETRY_OTLP_ENDPOINT": "http://127.0.0.1:4318",
        "MAAS_EXTPROC_TELEMETRY_OTLP_INTERVAL_S": "5s",
        "MAAS_EXTPROC_TELEMETRY_SERVICE_NAME": "edge",
    }
    config = load(None, environ, serving=False).telemetry
    assert (config.otlp.endpoint, config.otlp.interval_s, config.service_name) == (
        "http://127.0.0.1:4318",
        5,
        "edge",
    )
