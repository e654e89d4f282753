"""The one path reading: every hostile shape gets a path or None, never a guess or an exception."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.paths import model_route, normalize, under_model_prefix

CHAT = "/llm/opt/v1/chat/completions"


@pytest.mark.parametrize(
    "raw",
    [
        CHAT,
        CHAT + "?stream=true",
        CHAT + "/",
        CHAT + "//",
        "/llm/opt//v1/chat/completions",
        "//llm///opt/v1/chat/completions",
        "/llm/opt/v1/./chat/completions",
        "/llm/opt/v1/x/../chat/completions",
        "/llm/opt/v1/chat/%2e%2e/chat/completions",
        "/llm/opt/v1/chat/%2E/completions",
        "/llm/opt/v1/chat/completion%73",
        "/llm/opt/v1/chat/c%6Fmpletions",
        "/llm/opt/v1/chat/c%6fmpletions",
        "/%6c%6C%6d/opt/v1/chat/completions",
        "/llm/opt/v1/chat/completions;x",
        "/llm/opt/v1/chat;jsessionid=1/completions;a=b;c",
        "/llm;v=1/opt/v1/chat/completions",
        "/../../llm/opt/v1/chat/completions",
    ],
)
def test_every_spelling_of_the_chat_route_reads_the_same(raw: str) -> None:
    assert normalize(raw) == CHAT


@pytest.mark.parametrize(
    "raw",
    [
        "/llm/opt/v1/chat%2Fcompletions",  # one server splits here, the next does not
        "/llm/opt/v1/chat%2fcompletions",
        "/llm/opt/v1/chat%5Ccompletions",
        "/llm/opt/v1/chat%5ccompletions",
        "/llm/opt/v1\\chat/completions",
        "/llm/opt/v1/chat/completions/..;x/x",  # `..;x`: dots to us, a name to Envoy's router
        "/llm/opt/v1/chat/.;x/completions",
        "/llm/opt/v1/chat/%2e%2e;x/completions",
        "/llm/opt/v1/chat/completion%7",  # malformed escapes
        "/llm/opt/v1/chat/completion%",
        "/llm/opt/v1/chat/completion%zz",
        "/llm/opt/v1/chat/completions%00",  # control characters, raw or escaped
        "/llm/opt/v1/chat/completions%0d%0aX-Injected: 1",
        "/llm/opt/v1/chat/completions\x00",
        "/llm/opt/v1/chat/completions\r\n",
        "/llm/opt/v1/chat /completions",
        "/llm/opt/v1/chat/%ff%fe",  # not UTF-8
        "llm/opt/v1/chat/completions",  # not origin-form
        "*",
        "",
        "http://evil.example/v1/chat/completions",
    ],
)
def test_paths_without_a_single_reading_get_none(raw: str) -> None:
    assert normalize(raw) is None


def test_decoding_happens_once_and_keeps_non_ascii_text() -> None:
    assert normalize("/a/%2541") == "/a/%41"  # %25 is "%": never decoded twice
    assert normalize("/a/%C3%A9t%C3%A9") == "/a/été"
    assert normalize("/a/caf\u00e9") == "/a/café"
    assert normalize("/a/%3B") == "/a/;"  # an escaped ';' is data, not a parameter
    assert normalize("/") == "/"
    assert normalize("/..") == "/"


def test_model_route_and_model_prefix() -> None:
    assert model_route(CHAT) == ("llm", "opt")
    assert model_route("/v1/chat/completions") == ("", "")
    assert model_route("/a/b/c/v1/chat/completions") == ("", "")
    assert model_route("/llm/opt/v1/models/facebook/opt-125m") == ("llm", "opt")
    for path in ("/v1", "/v1/anything", "/llm/opt/tokenize", "/llm/opt/v1/x"):
        assert under_model_prefix(path), path
    for path in ("/", "/health", "/llm/opt", "/v2"):
        assert not under_model_prefix(path), path


@given(st.text(alphabet=st.sampled_from(list("/.;%?#\\2eEfF5cC0a-zv1 \x00é")), max_size=40))
def test_normalize_is_total_and_its_answer_is_canonical(raw: str) -> None:
    path = normalize(raw)
    if path is None:
        return
    assert path.startswith("/")
    assert path == "/" or not path.endswith("/")
    segments = path[1:].split("/")
    assert path == "/" or all(segments), "no empty segment: slashes are merged"
    assert not {".", ".."} & set(segments), "dot segments are resolved"
    assert normalize(raw + "?a=/../%2F") == path, "the query string plays no part"
