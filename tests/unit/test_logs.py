"""Worker logging: grpc's reset-stream traceback becomes one line; other errors keep theirs."""

from __future__ import annotations

import io
import logging

from extproc.logs import configure


class ExecuteBatchError(Exception):
    """Named as grpc's own (grpc._cython.cygrpc.ExecuteBatchError)."""


def test_a_reset_stream_is_one_info_line_and_other_errors_keep_their_traceback() -> None:
    configure("info", "worker=3")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.root.handlers[0].formatter)
    logging.root.addHandler(handler)
    try:
        grpc_log = logging.getLogger("grpc._cython.cygrpc")
        try:
            raise ExecuteBatchError("Failed execute_batch")
        except ExecuteBatchError:
            grpc_log.exception("ExecuteBatchError raised in core by servicer method")
        try:
            raise ValueError("something else")
        except ValueError:
            grpc_log.exception("unexpected")
    finally:
        logging.root.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert " INFO worker=3 grpc._cython.cygrpc stream reset by the peer" in lines[0]
    assert "ERROR worker=3 grpc._cython.cygrpc unexpected" in lines[1]
    assert lines[2].startswith("Traceback (most recent call last)")
