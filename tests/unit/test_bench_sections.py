"""docs/benchmarks.md's marked sections: written in place by their harness, kept by `make bench`."""

from __future__ import annotations

from pathlib import Path

from bench import sections


def test_a_section_is_written_in_place_and_kept(tmp_path: Path) -> None:
    report = tmp_path / "benchmarks.md"
    sections.write(report, "usage-api", "## Usage API\n\nfirst run\n")
    assert report.read_text().startswith("# Benchmarks\n")
    report.write_text("# Benchmarks\n\nmake bench's tables\n\n" + "".join(sections.kept(report)))
    sections.write(report, "usage-api", "## Usage API\n\nsecond run\n")
    sections.write(report, "other", "## Other\n")
    text = report.read_text()
    assert "first run" not in text
    assert text.count("second run") == 1
    assert text.index("make bench's tables") < text.index("second run") < text.index("## Other")
    assert [s.splitlines()[1] for s in sections.kept(report)] == ["## Usage API", "## Other"]


def test_no_report_keeps_nothing(tmp_path: Path) -> None:
    assert sections.kept(tmp_path / "missing.md") == []
