"""Logging setup shared by the supervisor and every worker: one line per event, who wrote it."""

from __future__ import annotations

import logging


def configure(level: str, who: str) -> None:
    """Timestamp, level, the process (``worker=N`` or ``supervisor``), logger, message."""
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {who} %(name)s %(message)s",
        force=True,
    )
