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

from extproc.accounting import envoy_usage
from extproc.charger import Charger
from extproc.config import DEFAULT_MAX_REQUEST_TOKENS, AccountingConfig
from extproc.envoy import handover
from extproc.envoy.access_log import finished
from extproc.envoy.replies import http_response

log = logging.getLogger("extproc.settle")

SETTLE_PATH = "/settle"
STATUS_HEADER = "x-maas-status"
BYTES_HEADER = "x-maas-bytes"
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

    async def answer(self, status: str, body: bytes, sent: str = "") -> bytes:
        billing_text, _, usage_text = body.decode("ascii", "replace").partition("\n")
        billing = handover.from_text(billing_text)
        if billing is None or not status.isdigit() or len(status) != 3:
            return _NOT_OURS
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
        await self._charger.charge(billing.charge(usage, int(status)))
        return _SETTLED

    def _broken(self, exc: Exception) -> None:
        log.error("settle: usage unreadable: %s: charged as without usage", type(exc).__name__)
