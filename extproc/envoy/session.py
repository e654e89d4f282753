"""Per-request ext_proc state: metadata -> request rewrite -> response headers -> body -> one charge."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from extproc.accounting import estimate
from extproc.accounting.decompress import Decoder, encoding_of
from extproc.accounting.extractor import UsageExtractor, extractor_for
from extproc.accounting.usage_filter import UsageEventFilter
from extproc.admission import AdmissionRequest
from extproc.config import AccountingConfig
from extproc.domain import Charge, Decision, Usage
from extproc.envoy.replies import METADATA_NAMESPACE


@dataclass(frozen=True, slots=True)
class Billing:
    """What ext_authz left in dynamic metadata for this request."""

    userid: str
    tier: str
    model: str
    path: str
    reserved: int
    windows: tuple[int, ...]
    inject: bool = False
    prompt_estimate: int = 0
    route: str = ""  # the HTTPRoute admission counted the request in

    @classmethod
    def from_decision(cls, decision: Decision, path: str) -> Billing | None:
        """The same record built in-process, when admission ran in the ext_proc stream."""
        if not decision.allowed or not decision.charged:
            return None
        assert decision.identity is not None
        assert decision.tier is not None
        return cls(
            userid=decision.identity.userid,
            tier=decision.tier.name,
            model=decision.model,
            path=path,
            reserved=decision.reserved_tokens,
            windows=decision.token_windows,
            inject=decision.inject_usage,
            prompt_estimate=decision.prompt_estimate,
            route=decision.route,
        )

    @classmethod
    def from_metadata(cls, filter_metadata: Any) -> Billing | None:
        struct = filter_metadata.get(METADATA_NAMESPACE)
        if struct is None:
            return None
        fields = struct.fields
        identity, maas = fields.get("identity"), fields.get("maas")
        if identity is None or maas is None:
            return None
        who = identity.struct_value.fields
        what = maas.struct_value.fields
        if not what["charged"].bool_value:
            return None
        return cls(
            userid=who["userid"].string_value,
            tier=who["tier"].string_value,
            model=what["model"].string_value,
            path=what["path"].string_value,
            reserved=int(what["reserved"].number_value),
            windows=tuple(int(v.number_value) for v in what["windows"].list_value.values),
            inject=what["inject"].bool_value if "inject" in what else False,
            prompt_estimate=int(what["prompt_est"].number_value) if "prompt_est" in what else 0,
            route=what["route"].string_value if "route" in what else "",
        )


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
        "_config",
        "_decoder",
        "_done",
        "_extractor",
        "_filter",
        "billing",
        "decision",
        "injected",
        "pending",
        "request_only",
        "status",
    )

    def __init__(self, config: AccountingConfig) -> None:
        self._config = config
        self.billing: Billing | None = None
        self.decision: Decision | None = None  # inline admission: the request's decision
        self.pending: AdmissionRequest | None = None  # inline admission: waiting for the body
        self.status = 0
        self.injected = False
        self.request_only = False  # a filter that never sees the response: never bills
        self._extractor: UsageExtractor | None = None
        self._decoder: Decoder | None = None
        self._filter: UsageEventFilter | None = None
        self._done = False

    def bind(self, filter_metadata: Any) -> None:
        """Read the billing record from the first message that carries ext_authz metadata."""
        if self.billing is None:
            self.billing = Billing.from_metadata(filter_metadata)

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
        self._extractor = extractor_for(
            content_type, self.billing.path, max_body_bytes=self._config.max_body_bytes
        )
        encoding = encoding_of(content_encoding) if content_encoding else None
        if encoding is not None:
            self._decoder = Decoder(encoding)
        elif (
            self.injected
            and self._config.hide_injected_usage
            and content_type.startswith("text/event-stream")
        ):
            self._filter = UsageEventFilter()
        return True

    def on_body(self, chunk: bytes, end_of_stream: bool) -> bytes | None:
        """Follow one chunk; returns the bytes to send on instead, when the body is rewritten."""
        extractor = self._extractor
        if extractor is None:
            return None
        decoder = self._decoder
        if decoder is not None:
            plain = decoder.feed(chunk)
            if end_of_stream:
                plain += decoder.finish()
            if plain:
                extractor.feed(plain)
        elif chunk:
            extractor.feed(chunk)
        if self._filter is None:
            return None
        out = self._filter.feed(chunk)
        return out + self._filter.finish() if end_of_stream else out

    @property
    def open(self) -> bool:
        """Billable and not yet charged."""
        return self.billing is not None and not self._done and not self.request_only

    def finish(self, *, disconnected: bool = False) -> Charge | None:
        """The charge for this response; None when nothing is billable or it was charged already.

        Reported usage is charged as reported. Missing parts of a successful (or cut-off) response
        are estimated and flagged; an upstream error without usage costs nothing.
        """
        billing = self.billing
        if billing is None or self._done or self.request_only:
            return None
        self._done = True
        extractor = self._extractor
        usage = extractor.finish() if extractor is not None else None
        failed = self.status >= 400
        if usage is not None and usage.total_tokens is not None:
            pass
        elif failed and (usage is None or not usage.reported):
            usage = Usage()
        else:
            chars = extractor.content_chars if extractor is not None else 0
            usage = estimate.completed(
                usage, billing.prompt_estimate, chars, self._config.chars_per_token
            )
        return Charge(
            userid=billing.userid,
            tier=billing.tier,
            model=billing.model,
            usage=usage,
            reserved_tokens=billing.reserved,
            token_windows=billing.windows,
            status=self.status,
            disconnected=disconnected,
            path=billing.path,
            route=billing.route,
        )
