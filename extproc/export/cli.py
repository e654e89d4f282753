"""`maas-extproc export`: follow the export stream with a consumer group into JSONL or CSV.

Each batch is written, flushed (and fsynced when writing a file), and only then acknowledged:
a crash in between writes the batch again on the next run (this consumer's pending entries come
first). Delivery is at least once; every line carries its ``stream`` and ``stream_id`` (and the
record its ``request_id``) so a downstream can drop repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import IO, Any

from extproc.config import Config
from extproc.errors import StoreUnavailable
from extproc.export import record as charge_record
from extproc.export.stream import Entry, GroupReader, redis_records
from extproc.observability.usage_query import spreadsheet_safe

CSV_COLUMNS = ("stream", "stream_id", "v", *charge_record.FIELDS)
_BLOCK_MS = 2000


def default_consumer() -> str:
    return socket.gethostname() or "export"


def json_line(entry: Entry, record: dict[str, Any]) -> str:
    return json.dumps({"stream": entry.stream, "stream_id": entry.id, **record}) + "\n"


def _cell(value: object) -> str | int | None:
    if value is None:
        return ""  # not reported: an empty cell, never 0
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return value
    return spreadsheet_safe(str(value))


def csv_lines(rows: Sequence[tuple[Entry, dict[str, Any]]], header: bool) -> str:
    """CSV (RFC 4180, CRLF) with every text cell ``spreadsheet_safe``, as the usage CSV."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    if header:
        writer.writerow(CSV_COLUMNS)
    for entry, record in rows:
        cells = {"stream": entry.stream, "stream_id": entry.id, **record}
        writer.writerow([_cell(cells.get(name)) for name in CSV_COLUMNS])
    return out.getvalue()


class _Output:
    """Where lines go: stdout, or a file opened for appending (synced to disk per batch)."""

    def __init__(self, path: str | None, fmt: str) -> None:
        self._file: IO[str] = sys.stdout
        self._owned = False
        if path:
            self._file = open(path, "a", encoding="utf-8", newline="")  # noqa: SIM115 - kept open
            self._owned = True
        self._fmt = fmt
        self._header = fmt == "csv" and (not self._owned or self._file.tell() == 0)

    def write(self, rows: Sequence[tuple[Entry, dict[str, Any]]]) -> None:
        if self._fmt == "csv":
            text = csv_lines(rows, self._header) if rows or self._header else ""
            self._header = False
        else:
            text = "".join(json_line(entry, record) for entry, record in rows)
        if text:
            self._file.write(text)
        self._file.flush()
        if self._owned:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._owned:
            self._file.close()


async def follow(
    reader: GroupReader, output: _Output, *, forever: bool, stop: asyncio.Event
) -> tuple[int, int]:
    """Copy batches to ``output`` until the stream is drained (or ``stop``, with ``forever``).

    Returns (records written, entries skipped: trimmed before they were read, or not records).
    """
    written = skipped = reported = 0
    while not stop.is_set():
        entries = await reader.next_batch(_BLOCK_MS if forever else 0)
        if reader.trimmed > reported:
            print(
                f"maas-extproc export: {reader.trimmed - reported} records were trimmed "
                "(export.stream.maxlen) before this group read them",
                file=sys.stderr,
            )
            reported = reader.trimmed
        if not entries:
            if forever:
                continue
            break
        rows: list[tuple[Entry, dict[str, Any]]] = []
        for entry in entries:
            try:
                rows.append((entry, charge_record.decode(entry.record)))
            except charge_record.BadRecord as exc:
                skipped += 1
                print(f"maas-extproc export: entry {entry.id} skipped: {exc}", file=sys.stderr)
        output.write(rows)
        await reader.ack(entries)
        written += len(rows)
    return written, skipped


def run_export(
    config: Config,
    group: str,
    consumer: str | None,
    fmt: str,
    path: str | None,
    forever: bool,
    from_start: bool,
) -> int:
    """Exit 0 when done (or stopped by a signal), 1 when the store fails, 2 for a memory store."""
    url = str(config.store.url)
    if url.startswith("memory:"):
        print(
            "maas-extproc export: the store is memory://, which a separate process cannot read; "
            "set store.url or MAAS_EXTPROC_STORE_URL to the sidecar's Redis",
            file=sys.stderr,
        )
        return 2
    if not config.export.stream.enabled:
        print("maas-extproc export: note: export.stream.enabled is false", file=sys.stderr)
    try:
        written, skipped = asyncio.run(
            _run(config, group, consumer or default_consumer(), fmt, path, forever, from_start)
        )
    except StoreUnavailable as exc:
        print(f"maas-extproc export: store unavailable: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"maas-extproc export: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"maas-extproc export: {written} records, {skipped} skipped", file=sys.stderr)
    return 0


async def _run(
    config: Config,
    group: str,
    consumer: str,
    fmt: str,
    path: str | None,
    forever: bool,
    from_start: bool,
) -> tuple[int, int]:
    timeout_s = _BLOCK_MS / 1000 + max(config.store.timeout_s, 1.0) + 1
    source = redis_records(str(config.store.url), config.export.stream.key, timeout_s)
    reader = GroupReader(source, group, consumer, from_start=from_start)
    output = _Output(path, fmt)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    try:
        return await follow(reader, output, forever=forever, stop=stop)
    finally:
        output.close()
        await source.close()
