"""Usage from the fields Envoy's sse_to_metadata / json_to_metadata filters wrote, one schema per path.

In the ``accesslog`` layout Envoy reads the usage itself: the rules of
``deploy/local/filters.yaml`` (``usage_sse``, ``usage_json``) copy each count of a response's
``usage`` object into dynamic metadata namespace ``maas.usage``, keyed by its path inside that
object (``prompt_tokens``, ``prompt_tokens_details.cached_tokens``, ...). SSE events are read in
order and a later value replaces an earlier one, as the per-schema extractors do ("latest wins":
Anthropic's ``message_start`` then ``message_delta``). Values keep their JSON type (the rules use
``PROTOBUF_VALUE``), so a hostile string or fraction is told apart from a count here, by the same
per-schema mapping (``openai``, ``responses``, ``anthropic``) that reads bodies in the sidecar.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from extproc.accounting import anthropic, counts, openai, responses
from extproc.config import DEFAULT_MAX_REQUEST_TOKENS
from extproc.domain import Usage

NAMESPACE = "maas.usage"

# Every key the filters write (the path inside ``usage``), by the schema that reports it. A test
# keeps this equal to the keys of the rules in deploy/local/filters.yaml.
OPENAI_FIELDS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "prompt_tokens_details.cached_tokens",
    "prompt_tokens_details.cache_write_tokens",
    "completion_tokens_details.reasoning_tokens",
)
RESPONSES_FIELDS = (
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "input_tokens_details.cached_tokens",
    "input_tokens_details.cache_write_tokens",
    "output_tokens_details.reasoning_tokens",
)
ANTHROPIC_FIELDS = (*anthropic.FIELDS, anthropic.THINKING)
FIELDS = frozenset((*OPENAI_FIELDS, *RESPONSES_FIELDS, *ANTHROPIC_FIELDS))

UsageOf = Callable[[object], Usage | None]
_SCHEMAS: tuple[tuple[str, UsageOf], ...] = (
    ("/v1/chat/completions", openai.usage_of),
    ("/v1/completions", openai.usage_of),
    ("/v1/embeddings", openai.usage_of),
    ("/v1/responses", responses.usage_of),
    ("/v1/messages", anthropic.usage_of),
)


def usage_object(fields: Mapping[str, object]) -> dict[str, object]:
    """The ``usage`` object the fields came from: ``a.b`` keys nested again, unknown keys dropped."""
    out: dict[str, object] = {}
    for key, value in fields.items():
        if key not in FIELDS:
            continue
        head, _, tail = key.partition(".")
        if not tail:
            out[head] = value
            continue
        inner = out.get(head)
        if not isinstance(inner, dict):
            inner = out[head] = {}
        inner[tail] = value
    return out


def _generic(raw: object) -> Usage | None:
    """Unknown paths: the schema whose names the fields use (as ``extractor.generic_body``)."""
    if not isinstance(raw, dict):
        return None
    if "prompt_tokens" in raw or "completion_tokens" in raw:
        return openai.usage_of(raw)
    if "total_tokens" in raw or "input_tokens_details" in raw:
        return responses.usage_of(raw)
    return anthropic.usage_of(raw)


def usage_of(
    path: str, fields: Mapping[str, object], max_count: int = DEFAULT_MAX_REQUEST_TOKENS
) -> Usage | None:
    """The usage of a response to ``path``; None when Envoy found none, untrusted when hostile."""
    if not fields:
        return None
    route = path.split("?", 1)[0].rstrip("/")
    mapping: UsageOf = _generic
    for suffix, schema in _SCHEMAS:
        if route.endswith(suffix):
            mapping = schema
            break
    return counts.within(mapping(usage_object(fields)), max_count)
