"""Logging setup shared by the supervisor and every worker: one line per event, who wrote it."""

from __future__ import annotations

import logging

# grpc.aio logs a traceback at ERROR when it sends the final status of a stream Envoy has already
# reset (the client left right after the last reply): nothing is lost, and it is not an error of
# ours. It becomes one INFO line.
_GRPC_LOGGER = "grpc._cython.cygrpc"


class _StreamAlreadyReset(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and type(exc).__name__ == "ExecuteBatchError":
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "stream reset by the peer before its status was sent", ()
            record.exc_info, record.exc_text = None, None
        return True


def configure(level: str, who: str) -> None:
    """Timestamp, level, the process (``worker=N`` or ``supervisor``), logger, message."""
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {who} %(name)s %(message)s",
        force=True,
    )
    grpc_log = logging.getLogger(_GRPC_LOGGER)
    if not any(isinstance(f, _StreamAlreadyReset) for f in grpc_log.filters):
        grpc_log.addFilter(_StreamAlreadyReset())
