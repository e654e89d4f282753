"""External tools a test needs: missing, the test skips on a workstation but fails in CI (``CI`` set),
so a CI run can never pass by skipping what it was meant to run."""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing_tool(message: str) -> NoReturn:
    if in_ci():
        pytest.fail(f"{message} (CI is set: .ci/run must install it)", pytrace=False)
    pytest.skip(message)


def require_tool(binary: str, message: str) -> str:
    """The path of ``binary`` on PATH, else skip (or fail in CI) with ``message``."""
    found = shutil.which(binary)
    if found is None:
        missing_tool(message)
    return found
