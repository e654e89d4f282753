"""Per-request ext_proc state: metadata and response headers -> body chunks -> end -> one charge."""

from __future__ import annotations

from dataclasses import dataclass

from extproc.accounting.extractor import UsageExtractor, extractor_for
from extproc.domain import Charge, Usage
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

    @classmethod
    def from_metadata(cls, filter_metadata: object) -> Billing | None:
        struct = filter_metadata.get(METADATA_NAMESPACE)  # type: ignore[attr-defined]
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
        )


class Session:
    """One HTTP request's accounting. Feed it what Envoy sends; ``finish`` yields the charge once."""

    __slots__ = ("_done", "_extractor", "billing", "status")

    def __init__(self) -> None:
        self.billing: Billing | None = None
        self.status = 0
        self._extractor: UsageExtractor | None = None
        self._done = False

    def bind(self, filter_metadata: object) -> None:
        """Read the billing record from the first message that carries ext_authz metadata."""
        if self.billing is None:
            self.billing = Billing.from_metadata(filter_metadata)

    def on_response_headers(self, status: int, content_type: str) -> bool:
        """Record the response start; True when the body must be followed."""
        self.status = status
        if self.billing is None:
            return False
        self._extractor = extractor_for(content_type, self.billing.path)
        return True

    def on_body(self, chunk: bytes) -> None:
        if self._extractor is not None and chunk:
            self._extractor.feed(chunk)

    @property
    def open(self) -> bool:
        """Billable and not yet charged."""
        return self.billing is not None and not self._done

    def finish(self, *, disconnected: bool = False) -> Charge | None:
        """The charge for this response; None when nothing is billable or it was charged already."""
        billing = self.billing
        if billing is None or self._done:
            return None
        self._done = True
        usage = self._extractor.finish() if self._extractor is not None else None
        if usage is None or (not 200 <= self.status < 300 and not usage.reported):
            usage = Usage()
        return Charge(
            userid=billing.userid,
            tier=billing.tier,
            model=billing.model,
            usage=usage,
            reserved_tokens=billing.reserved,
            token_windows=billing.windows,
            status=self.status,
            disconnected=disconnected,
        )
