"""Sections of docs/benchmarks.md that other harnesses write (``python -m bench.usage_api``), each
between two marker lines, kept when ``make bench`` writes the rest of the report."""

from __future__ import annotations

import re
from pathlib import Path

_SECTION = re.compile(r"<!-- section:([a-z0-9-]+) -->\n.*?<!-- end:\1 -->\n", re.DOTALL)


def marked(name: str, body: str) -> str:
    return f"<!-- section:{name} -->\n{body.rstrip()}\n<!-- end:{name} -->\n"


def kept(path: Path) -> list[str]:
    """Every marked section of the report at ``path`` (none when there is no report yet)."""
    if not path.exists():
        return []
    return [match.group(0) for match in _SECTION.finditer(path.read_text())]


def write(path: Path, name: str, body: str) -> None:
    """Put section ``name`` into the report at ``path``: in its place, or at the end."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = marked(name, body)
    pattern = re.compile(
        rf"<!-- section:{re.escape(name)} -->\n.*?<!-- end:{re.escape(name)} -->\n", re.DOTALL
    )
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
