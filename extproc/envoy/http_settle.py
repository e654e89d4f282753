"""The ``lean`` layout's settle before the last byte: Envoy's Lua filter posts the usage here.

The Lua filter ``settle`` (deploy/local/filters.yaml) waits, without holding the body, for the end
of each response that carries a billing record (``handle:trailers()``), then posts to
``POST /settle`` on the HTTP authorization port, holding the response's last chunk until the
answer (Envoy's Lua filter buffers the final data while a ``httpCall`` is pending:
envoyproxy/envoy ``source/extensions/filters/http/lua/lua_filter.cc``, ``onData``; measured with
Envoy 1.40: a stream's end waited for a slow call, its first bytes did not). So a response whose
usage Envoy read is charged before the client has all of it, as ``full`` charges it.

The body is two lines: the billing record exactly as ext_authz's reply left it in metadata
(``x-maas-billing``, handover.to_text) and the ``maas.usage`` namespace as JSON (written by
sse_to_metadata / json_to_metadata; empty when none was read); ``x-maas-status`` holds the
response's status, and ``x-maas-bytes`` the body's size for a response that is not a stream (the
filter counts it: json_to_metadata hands a JSON body on in one chunk or a few).

A body that is not a stream and in which Envoy read no usage (none, a count its JSON parser
refuses such as a 400-digit literal, a gzip or deflate body it cannot inflate) comes along as a
third part, after a second newline, with ``x-maas-body-type`` and ``x-maas-body-encoding`` (the
response's content type and coding): the sidecar reads it with the extractor the ``full`` layout
feeds (``session.Session``), so such a response gets the same charge and the same
``maas_upstream_usage_invalid_total`` count as there (a decompression bomb included).

Answers: ``200`` once the charge is settled (or ``accounting.settle_wait_s`` has passed, as in
``full``); the filter then marks the request ``maas.settled`` and the access log leaves it out.
With the body's size, every response is charged here, as the access log would charge it
(``access_log.finished``: reported, estimated, untrusted, nothing for an error). Without it (a
stream), ``204`` when the usage read is not a reported total: not settled here, so the access
log's entry charges it with the bytes sent and the stream's sample. ``400`` for a
body that is not ours. A response cut short never reaches the end the filter waits for: the
access log charges it.
"""

from __future__ import annotations

import json
import logging
import time

from extproc.accounting import envoy_usage
from extproc.charger import Charger
from extproc.config import DEFAULT_MAX_REQUEST_TOKENS, AccountingConfig
from extproc.domain import Charge
from extproc.envoy import handover
from extproc.envoy.access_log import finished
from extproc.envoy.replies import http_response
from extproc.envoy.session import Session

log = logging.getLogger("extproc.settle")

SETTLE_PATH = "/settle"
STATUS_HEADER = "x-maas-status"
BYTES_HEADER = "x-maas-bytes"
BODY_TYPE_HEADER = "x-maas-body-type"  # present when the body follows the usage line
BODY_ENCODING_HEADER = "x-maas-body-encoding"
_SETTLED = http_response(200, [])
_NOT_HERE = http_response(204, [])
_NOT_OURS = http_response(400, [])


class HttpSettle:
    """Charges a finished response from the usage Envoy read, when it reported a total."""

    def __init__(
        self,
        charger: Charger,
        max_count: int = DEFAULT_MAX_REQUEST_TOKENS,
        config: AccountingConfig | None = None,
    ) -> None:
        self._charger = charger
        self._max_count = max_count
        self._config = config or AccountingConfig()

    async def answer(
        self,
        status: str,
        body: bytes,
        sent: str = "",
        body_type: str | None = None,
        body_encoding: str = "",
    ) -> bytes:
        billing_raw, _, usage_raw = body.partition(b"\n")
        raw = b""  # the response body itself, after a second newline when ``body_type`` is set
        if body_type is not None:
            usage_raw, _, raw = usage_raw.partition(b"\n")
        billing = handover.from_text(billing_raw.decode("ascii", "replace"))
        # ASCII digits only: "²00" passes str.isdigit() but not int().
        if billing is None or not (status.isascii() and status.isdigit()) or len(status) != 3:
            return _NOT_OURS
        duration_ms = _since(billing.admitted_ms)
        if body_type is not None:  # Envoy read no usage in this body: read it here
            charge = self._read(billing, int(status), body_type, body_encoding, raw, duration_ms)
            if charge is not None:
                await self._charger.charge(charge)
            return _SETTLED
        usage_text = usage_raw.decode("ascii", "replace")
        try:
            fields = json.loads(usage_text) if usage_text else {}
        except (ValueError, RecursionError):
            return _NOT_HERE  # unreadable here: the access log charges it
        if not isinstance(fields, dict):
            return _NOT_HERE
        if sent.isdigit() and sent.isascii() and len(sent) < 20:  # a body: charged here, whatever
            charge = finished(
                billing,
                lambda: fields,
                status=int(status),
                body_bytes=int(sent),
                disconnected=False,
                config=self._config,
                max_count=self._max_count,
                broken=self._broken,
                duration_ms=duration_ms,
            )
            await self._charger.charge(charge)
            return _SETTLED
        try:
            usage = envoy_usage.usage_of(billing.path, fields, self._max_count)
        except Exception as exc:  # a bug of ours: the access log charges it instead
            log.error("settle failed: %s: left to the access log", type(exc).__name__)
            return _NOT_HERE
        # Only a reported total is charged here (estimate.charged's exact case); everything else
        # (none read, partial, untrusted) is the access log's, with the body bytes it knows.
        if usage is None or usage.invalid or usage.total_tokens is None:
            return _NOT_HERE
        await self._charger.charge(billing.charge(usage, int(status), duration_ms=duration_ms))
        return _SETTLED

    def _read(
        self,
        billing: handover.Billing,
        status: int,
        body_type: str,
        encoding: str,
        raw: bytes,
        duration_ms: int,
    ) -> Charge | None:
        """The charge of a whole body, read as ext_proc's session reads it in ``full``."""
        session = Session(self._config, self._max_count)
        session.billing = billing
        try:
            session.on_response_headers(status, body_type, encoding)
            session.on_body(raw, True)
        except Exception as exc:  # a bug of ours: charged as without usage, as full does
            self._broken(exc)
            session.broken()
        return session.finish(duration_ms=duration_ms)

    def _broken(self, exc: Exception) -> None:
        log.error("settle: usage unreadable: %s: charged as without usage", type(exc).__name__)


def _since(admitted_ms: int) -> int:
    """The request's duration as far as the sidecar knows it: from its admission (right after
    Envoy received the request headers) to this settle (just before the last byte leaves), in
    whole ms and at least 1 (both ends are read in ms: a response faster than that would read
    as 0, which means "no duration"); 0 when there was no admission clock. What ``full``
    measures from its ext_proc stream."""
    return max(1, int(time.time() * 1000) - admitted_ms) if admitted_ms > 0 else 0
