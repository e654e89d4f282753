"""Per-request ext_proc state: metadata -> request rewrite -> response headers -> body -> one charge."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from extproc.accounting import estimate
from extproc.accounting.decompress import encoding_of
from extproc.accounting.extractor import UsageExtractor, extractor_for
from extproc.accounting.usage_filter import UsageEventFilter
from extproc.config import DEFAULT_MAX_REQUEST_TOKENS, AccountingConfig
from extproc.domain import Charge, Decision, Usage
from extproc.envoy import handover
from extproc.envoy.handover import Billing


def with_include_usage(body: bytes) -> bytes | None:
    """The request body asking for stream usage, or None when it cannot be rewritten."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    options = data.get("stream_options")
    options = dict(options) if isinstance(options, dict) else {}
    options["include_usage"] = True
    data["stream_options"] = options
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


class Session:
    """One HTTP request's accounting. Feed it what Envoy sends; ``finish`` yields the charge once."""

    __slots__ = (
        "_broken",
        "_config",
        "_done",
        "_extractor",
        "_filter",
        "_max_count",
        "billing",
        "decision",
        "injected",
        "request_only",
        "status",
    )

    def __init__(
        self, config: AccountingConfig, max_count: int = DEFAULT_MAX_REQUEST_TOKENS
    ) -> None:
        self._config = config
        self._max_count = max_count  # limits.max_request_tokens: larger usage is not trusted
        self.billing: Billing | None = None
        self.decision: Decision | None = None  # inline admission: the request's decision
        self.status = 0
        self.injected = False
        self.request_only = False  # a filter that never sees the response: never bills
        self._extractor: UsageExtractor | None = None
        self._filter: UsageEventFilter | None = None
        self._done = False
        self._broken = False

    def bind(self, filter_metadata: Mapping[str, Any]) -> None:
        """Read the billing record from the first message that carries ext_authz metadata."""
        if self.billing is None:
            self.billing = handover.read(filter_metadata)

    @property
    def wants_request_body(self) -> bool:
        return self.billing is not None and self.billing.inject

    def rewrite_request(self, body: bytes) -> bytes | None:
        """The body with ``stream_options.include_usage`` set, or None to leave it as it is."""
        rewritten = with_include_usage(body)
        self.injected = rewritten is not None
        return rewritten

    def on_response_headers(self, status: int, content_type: str, content_encoding: str) -> bool:
        """Record the response start; True when the body must be followed."""
        self.status = status
        if self.billing is None:
            return False
        encoding = encoding_of(content_encoding) if content_encoding else None
        self._extractor = extractor_for(
            content_type,
            self.billing.path,
            max_body_bytes=self._config.max_body_bytes,
            max_count=self._max_count,
            encoding=encoding,
            max_ratio=self._config.max_decompression_ratio,
        )
        if encoding is None and (
            self.injected
            and self._config.hide_injected_usage
            and content_type.startswith("text/event-stream")
        ):
            self._filter = UsageEventFilter()
        return True

    def on_body(self, chunk: bytes, end_of_stream: bool) -> bytes | None:
        """Follow one chunk; returns the bytes to send on instead, when the body is rewritten."""
        extractor = self._extractor
        if extractor is None or self._broken:
            return None
        if chunk:
            extractor.feed(chunk)  # compressed bodies are decoded (and capped) by the extractor
        if self._filter is None:
            return None
        out = self._filter.feed(chunk)
        return out + self._filter.finish() if end_of_stream else out

    def broken(self) -> None:
        """Following the body failed unexpectedly: stop reading it; the charge becomes an estimate."""
        self._broken = True
        self._filter = None

    @property
    def open(self) -> bool:
        """Billable and not yet charged."""
        return self.billing is not None and not self._done and not self.request_only

    def finish(self, *, disconnected: bool = False, duration_ms: int = 0) -> Charge | None:
        """The charge for this response; None when nothing is billable or it was charged already.

        Reported usage is charged as reported. Missing parts of a successful (or cut-off) response
        are estimated and flagged; an upstream error without usage costs nothing.
        """
        billing = self.billing
        if billing is None or self._done or self.request_only:
            return None
        usage = self._usage(billing)
        self._done = True
        return billing.charge(
            usage, self.status, disconnected=disconnected, duration_ms=duration_ms
        )

    def _usage(self, billing: Billing) -> Usage:
        extractor = self._extractor
        usage = extractor.finish() if extractor is not None and not self._broken else None
        # An estimate never passes the request's own bound: its reservation (prompt estimate +
        # completion bound). 0 means no window took one (unlimited tier, store down): no cap.
        return estimate.charged(
            usage,
            failed=self.status >= 400,
            prompt_estimate=billing.prompt_estimate,
            content_chars=extractor.content_chars if extractor is not None else 0,
            chars_per_token=self._config.chars_per_token,
            cap=billing.reserved or None,
            who=(billing.userid, billing.model),
        )
