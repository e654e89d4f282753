"""What a response costs: its tokens split into disjoint kinds, times integer prices, rounded up.

Money is integers from end to end: a price is micro-units of the currency per 1,000,000 tokens
(``micros_per_million``), so a price written with up to six decimals per million tokens (or
twelve per token, as MaaS's ``billingRate.perToken``) is held exactly. A response's cost is the
exact sum over its kinds of ``tokens * micros_per_million``, divided by 1,000,000 and rounded UP
to a whole micro-unit, once per request: a request is never free because it is small, and the
error is below one micro-unit per request.

The kinds are disjoint (``BILLED_KINDS``), so every token is priced once:

- ``input`` = prompt - cached - cache_creation; ``cached_input`` = cached input read;
  ``cache_creation`` = input written to a cache (Anthropic);
- ``output`` = completion - reasoning; ``reasoning`` = reasoning tokens.

A part the upstream does not report is derived from the total (``completion = total - prompt``;
``prompt = total - completion``); a usage with a total only is all ``input``. Informational
counts larger than the part they belong to are capped at it (an upstream that reports 90 cached
tokens of an 80-token prompt prices 80 as cached), so the kinds always add up to the parts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from extproc.domain import Charge, Usage

BILLED_KINDS = ("input", "cached_input", "cache_creation", "output", "reasoning")
# A kind without a price of its own costs what its parent kind costs.
FALLBACK = {"cached_input": "input", "cache_creation": "input", "reasoning": "output"}
MILLION = 1_000_000
# The largest price we accept: 10**15 micro-units per million tokens (1,000 units per token).
# With at most limits.max_request_tokens per count, a day's ledger sum stays far from 2**63.
MAX_MICROS_PER_MILLION = 10**15
_MAX_TEXT = 40  # a decimal price longer than this is not a price
_DECIMAL = re.compile(r"([0-9]+)(?:\.([0-9]+))?\Z")


def split(usage: Usage) -> dict[str, int]:
    """The disjoint token counts of ``BILLED_KINDS`` (see the module docstring); they sum to the
    prompt plus the completion."""
    return dict(zip(BILLED_KINDS, parts(usage), strict=True))


def parts(usage: Usage) -> tuple[int, int, int, int, int]:
    """``split``'s counts in ``BILLED_KINDS`` order (no dict: it runs on every charge)."""
    prompt, completion = usage.prompt_tokens, usage.completion_tokens
    if prompt is None and completion is None:
        return usage.total(), 0, 0, 0, 0
    if completion is None:
        completion = max(0, usage.total() - (prompt or 0))
    if prompt is None:
        prompt = max(0, usage.total() - completion)
    cached = min(usage.cached_tokens or 0, prompt)
    written = min(usage.cache_creation_tokens or 0, prompt - cached)
    reasoning = min(usage.reasoning_tokens or 0, completion)
    return prompt - cached - written, cached, written, completion - reasoning, reasoning


def decimal_units(text: str, decimals: int) -> int:
    """A non-negative decimal string times ``10**decimals``, exactly; ValueError for anything
    else (a sign, an exponent, NaN, spaces inside, more decimals than ``decimals``, too long).

    Trailing zeros past ``decimals`` are allowed (``"0.50000000000000"``): they change nothing.
    """
    if not isinstance(text, str):
        raise ValueError("not a string")
    stripped = text.strip()
    if len(stripped) > _MAX_TEXT:
        raise ValueError(f"longer than {_MAX_TEXT} characters")
    match = _DECIMAL.match(stripped)
    if match is None:
        raise ValueError("not a plain decimal number such as 0.002 (no sign, no exponent)")
    whole, fraction = match[1], (match[2] or "").rstrip("0")
    if len(fraction) > decimals:
        raise ValueError(f"more than {decimals} decimal places")
    return int(whole + fraction.ljust(decimals, "0"))


def checked_price(micros_per_million: int) -> int:
    """``micros_per_million`` if it is a price we accept; ValueError otherwise."""
    if type(micros_per_million) is not int or micros_per_million < 0:
        raise ValueError("not a non-negative integer")
    if micros_per_million > MAX_MICROS_PER_MILLION:
        raise ValueError(f"above {MAX_MICROS_PER_MILLION} micro-units per million tokens")
    return micros_per_million


@dataclass(frozen=True, slots=True)
class Prices:
    """Integer prices per ``BILLED_KINDS`` kind: micro-units per 1,000,000 tokens.

    A kind left out costs what ``FALLBACK`` names (cached input and cache creation: input;
    reasoning: output); ``input`` or ``output`` left out costs 0.
    """

    micros_per_million: Mapping[str, int] = field(default_factory=dict)
    # Every kind's price after the fallbacks, in BILLED_KINDS order (worked out once).
    in_order: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "in_order", tuple(self.of(kind) for kind in BILLED_KINDS))

    def of(self, kind: str) -> int:
        """The price of one kind, after the fallbacks."""
        price = self.micros_per_million.get(kind)
        if price is None and kind in FALLBACK:
            price = self.micros_per_million.get(FALLBACK[kind])
        return price or 0

    def over(self, base: Prices) -> Prices:
        """These prices, with every kind they leave out taken from ``base`` (an override)."""
        return Prices({**base.micros_per_million, **self.micros_per_million})

    @classmethod
    def flat(cls, micros_per_million: int) -> Prices:
        """One price for every kind (never raises: check it first, ``checked_price``)."""
        return cls(dict.fromkeys(BILLED_KINDS, micros_per_million))

    @classmethod
    def parse_per_token(cls, text: str) -> Prices:
        """MaaS's ``billingRate.perToken`` (a decimal string, currency units per token, up to 12
        decimals) as a flat price; ValueError for anything else."""
        return cls.flat(per_token_micros(text))

    @classmethod
    def parse_per_million(cls, prices: Mapping[str, str]) -> Prices:
        """Decimal strings per million tokens (up to 6 decimals) per kind; ValueError naming
        the kind for a bad one or a kind not in ``BILLED_KINDS``."""
        parsed: dict[str, int] = {}
        for kind, text in prices.items():
            if kind not in BILLED_KINDS:
                raise ValueError(f"{kind}: not one of {', '.join(BILLED_KINDS)}")
            try:
                parsed[kind] = per_million_micros(text)
            except ValueError as exc:
                raise ValueError(f"{kind}: {exc}") from None
        return cls(parsed)


def per_million_micros(text: str) -> int:
    """A decimal price per million tokens as micro-units per million (``"2.50"`` -> 2500000)."""
    return checked_price(decimal_units(text, 6))


def per_token_micros(text: str) -> int:
    """A per-token decimal price as micro-units per million tokens (``"0.000002"`` -> 2000000)."""
    return checked_price(decimal_units(text, 12))


def cost_micros(usage: Usage, prices: Prices) -> int:
    """The cost of one response: exact integer sum over the kinds, rounded up to a micro-unit."""
    exact = sum(n * price for n, price in zip(parts(usage), prices.in_order, strict=True))
    return -(-exact // MILLION)


@dataclass(frozen=True, slots=True)
class ModelPrices:
    """A model's prices and its per-plan (tier or ``<namespace>/<name>`` subscription) overrides,
    each already merged over the model's prices."""

    prices: Prices
    plans: Mapping[str, Prices] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PriceBook:
    """The configured ``pricing:``: per model, with a ``default`` for models not listed.

    Which price applies, most specific first: the model's override for the plan; the
    subscription's ``billingRate.perToken`` for the model (subscription era); the model's
    prices; none (the charge is then not priced, cost 0).
    """

    models: Mapping[str, ModelPrices] = field(default_factory=dict)
    default: ModelPrices | None = None

    def prices_for(
        self, model: str, plan: str, billing_rate: Prices | None = None
    ) -> Prices | None:
        entry = self.models.get(model, self.default)
        if entry is not None and plan in entry.plans:
            return entry.plans[plan]
        if billing_rate is not None:
            return billing_rate
        return entry.prices if entry is not None else None


NO_PRICES = PriceBook()


def priced(charge: Charge, book: PriceBook) -> Charge:
    """``charge`` with its cost, when a price applies (``PriceBook.prices_for``); else as it is.

    The subscription era's ``billingRate.perToken`` comes with the charge (``billing_rate``);
    the model is the one the ledger books (``"unknown"`` when the request named none).
    """
    rate = charge.billing_rate
    prices = book.prices_for(
        charge.model or "unknown", charge.plan, None if rate is None else Prices.flat(rate)
    )
    if prices is None:
        return charge
    return replace(charge, cost_micros=cost_micros(charge.usage, prices), priced=True)
