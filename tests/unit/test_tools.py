"""A missing external tool skips a test on a workstation and fails it in CI."""

from __future__ import annotations

import pytest

from tests.tools import require_tool

ABSENT = "maas-no-such-tool-anywhere"


@pytest.mark.parametrize("value", ["", "0", "false"])
def test_a_missing_tool_skips_outside_ci(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        require_tool(ABSENT, f"{ABSENT} not installed")


@pytest.mark.parametrize("value", ["true", "1"])
def test_a_missing_tool_fails_in_ci(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match=r"not installed \(CI is set"):
        require_tool(ABSENT, f"{ABSENT} not installed")


def test_a_present_tool_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    assert require_tool("sh", "no shell").endswith("/sh")
