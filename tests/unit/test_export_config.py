"""The `export` settings: defaults, environment overrides, defined errors, and which worker pushes."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.app import worker_config
from extproc.config import ExportConfig, load, parse
from extproc.errors import ConfigError
from tests.helpers import LOCAL


def test_the_sample_config_holds_the_defaults() -> None:
    loaded = load(LOCAL / "config.yaml", {}, serving=False)
    assert loaded.export == ExportConfig()
    assert loaded.export.stream.enabled
    assert loaded.export.stream.maxlen == 250_000
    assert not loaded.export.cloudevents.url


def test_environment_overrides_reach_both_parts() -> None:
    loaded = load(
        None,
        {
            "MAAS_EXTPROC_EXPORT_STREAM_MAXLEN": "10",
            "MAAS_EXTPROC_EXPORT_CLOUDEVENTS_URL": "https://user:secret@sink.example/in",
            "MAAS_EXTPROC_EXPORT_CLOUDEVENTS_RETRY_MAX_S": "2m",
        },
        serving=False,
    )
    assert loaded.export.stream.maxlen == 10
    assert loaded.export.cloudevents.retry_max_s == 120
    assert "secret" not in repr(loaded.export)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"stream": {"key": "maas:{x}"}}, "export.stream.key"),
        ({"stream": {"key": ""}}, "export.stream.key"),
        ({"stream": {"maxlen": -1}}, "export.stream.maxlen"),
        ({"stream": {"enabled": "yes"}}, "export.stream.enabled"),
        ({"stream": {"bogus": 1}}, "export.stream.bogus"),
        ({"cloudevents": {"url": "ftp://x"}}, "export.cloudevents.url"),
        ({"cloudevents": {"url": "http://"}}, "export.cloudevents.url"),
        (
            {"stream": {"enabled": False}, "cloudevents": {"url": "http://x/"}},
            "export.cloudevents.url",
        ),
        ({"cloudevents": {"type": ""}}, "export.cloudevents.type"),
        ({"cloudevents": {"spool_size": 0}}, "export.cloudevents.spool_size"),
        ({"cloudevents": {"concurrency": 0}}, "export.cloudevents.concurrency"),
        ({"cloudevents": {"retry_initial_s": "5s", "retry_max_s": "1s"}}, "export.cloudevents"),
        ({"nope": {}}, "export.nope"),
        ("text", "export"),
    ],
)
def test_a_bad_setting_names_its_key(raw: Any, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse({"export": raw}, serving=False)
    assert str(caught.value).startswith(key)


def test_only_worker_zero_pushes_cloudevents() -> None:
    config = parse({"export": {"cloudevents": {"url": "http://127.0.0.1:9/e"}}}, serving=False)
    assert worker_config(config, 0).export.cloudevents.url == "http://127.0.0.1:9/e"
    assert not worker_config(config, 1).export.cloudevents.url
    assert worker_config(config, 1).export.stream.enabled  # every worker writes records
