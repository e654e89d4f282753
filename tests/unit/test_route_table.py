"""RouteTable remembers what it classified (issue #17's profiling pass), within bounds a hostile
client cannot grow: long paths are classified every time, and the memory empties when full."""

from __future__ import annotations

from extproc.config import RoutesConfig
from extproc.routes import RouteTable

CHAT = "/llm/m/v1/chat/completions"


def test_a_remembered_route_is_the_route() -> None:
    table = RouteTable(RoutesConfig())
    first = table.classify("POST", CHAT)
    assert first.charged
    assert not first.invalid
    assert table.classify("POST", CHAT) is first
    assert not table.classify("GET", CHAT).charged  # the method is part of the key


def test_a_long_path_is_classified_but_not_remembered() -> None:
    table = RouteTable(RoutesConfig())
    long_path = "/llm/" + "a" * 60_000 + "/v1/chat/completions"
    assert table.classify("POST", long_path).charged
    assert table.classify("POST", long_path).charged
    assert ("POST", long_path) not in table._seen  # the bound under test


def test_the_memory_never_passes_its_size() -> None:
    table = RouteTable(RoutesConfig())
    for n in range(10_000):
        table.classify("POST", f"/llm/m{n}/v1/chat/completions")
    assert len(table._seen) <= 4096  # the bound under test
    assert table.classify("POST", "/llm/m9999/v1/chat/completions").charged
