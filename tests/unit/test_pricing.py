"""Token kinds and cost: the disjoint split, exact integer prices, the rounding rule, hostile text."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from extproc import config
from extproc.accounting import pricing
from extproc.accounting.pricing import BILLED_KINDS, ModelPrices, PriceBook, Prices
from extproc.domain import Charge, Usage
from extproc.errors import ConfigError
from extproc.store import keys, ledger


def test_split_is_disjoint_and_sums_to_the_parts() -> None:
    usage = Usage(100, 50, 150, cached_tokens=60, cache_creation_tokens=10, reasoning_tokens=20)
    assert pricing.split(usage) == {
        "input": 30,
        "cached_input": 60,
        "cache_creation": 10,
        "output": 30,
        "reasoning": 20,
    }


@pytest.mark.parametrize(
    ("usage", "want"),
    [
        (Usage(total_tokens=9), {"input": 9}),  # a total only: all input
        (Usage(prompt_tokens=12, total_tokens=12), {"input": 12}),  # embeddings
        (Usage(prompt_tokens=5, total_tokens=8), {"input": 5, "output": 3}),
        (Usage(completion_tokens=5, total_tokens=8), {"input": 3, "output": 5}),
        (Usage(80, 0, 80, cached_tokens=90), {"cached_input": 80}),  # capped at the prompt
        (
            Usage(10, 4, 14, cached_tokens=6, cache_creation_tokens=9),
            {"cached_input": 6, "cache_creation": 4, "output": 4},
        ),
        (Usage(1, 3, 4, reasoning_tokens=7), {"input": 1, "reasoning": 3}),
        (Usage(), {}),
    ],
)
def test_split_derives_missing_parts_and_caps_kinds(usage: Usage, want: dict[str, int]) -> None:
    assert pricing.split(usage) == {**dict.fromkeys(BILLED_KINDS, 0), **want}


counts = st.none() | st.integers(0, 10**6)


@given(counts, counts, counts, counts, counts, counts)
def test_split_never_goes_negative_and_adds_up(
    p: int | None, c: int | None, t: int | None, r: int | None, w: int | None, x: int | None
) -> None:
    usage = Usage(p, c, t, cached_tokens=r, cache_creation_tokens=w, reasoning_tokens=x)
    parts = pricing.split(usage)
    assert all(n >= 0 for n in parts.values())
    if p is not None and c is not None:
        assert sum(parts.values()) == p + c


def test_cost_is_exact_and_rounded_up_once_per_request() -> None:
    # $2.50 / $1.25 / $10 per million tokens; reasoning falls back to output.
    prices = Prices.parse_per_million({"input": "2.50", "cached_input": "1.25", "output": "10"})
    usage = Usage(1000, 300, 1300, cached_tokens=800, reasoning_tokens=100)
    exact = Fraction(200 * 2_500_000 + 800 * 1_250_000 + 300 * 10_000_000, 10**6)
    assert exact == 4500  # 0.0045 units: exactly 4500 micro-units
    assert pricing.cost_micros(usage, prices) == 4500
    one_more = Usage(1001, 300, 1301, cached_tokens=800, reasoning_tokens=100)
    assert pricing.cost_micros(one_more, prices) == 4503  # 4502.5 rounded up
    # One token at $0.000001 per million is 10**-12 units: rounded up to one micro-unit.
    assert pricing.cost_micros(Usage(1, 0, 1), Prices.parse_per_million({"input": "0.000001"})) == 1
    assert pricing.cost_micros(Usage(0, 0, 0), prices) == 0


@given(st.integers(0, 10**7), st.integers(0, 10**7), st.integers(0, 10**15), st.integers(0, 10**15))
def test_cost_is_the_ceiling_of_the_exact_rational(p: int, c: int, pin: int, pout: int) -> None:
    prices = Prices({"input": pin, "output": pout})
    exact = Fraction(p * pin + c * pout, 10**6)
    cost = pricing.cost_micros(Usage(p, c), prices)
    assert cost - 1 < exact <= cost


def test_fallbacks_and_overrides() -> None:
    base = Prices({"input": 3, "output": 5})
    assert [base.of(k) for k in BILLED_KINDS] == [3, 3, 3, 5, 5]
    assert [Prices({"cached_input": 1}).over(base).of(k) for k in BILLED_KINDS] == [3, 1, 3, 5, 5]
    assert Prices().of("reasoning") == 0


def test_per_token_rate_is_exact() -> None:
    assert Prices.parse_per_token("0.000002").of("reasoning") == 2_000_000  # $2 per million
    assert Prices.parse_per_token("0.001").of("input") == 10**9
    assert Prices.parse_per_token("0.000000000001").of("output") == 1
    assert Prices.parse_per_token(" 1000 ").of("input") == 10**15
    assert Prices.parse_per_token("0.50000000000000000").of("input") == 5 * 10**11


@pytest.mark.parametrize(
    "text",
    ["", "-0.1", "+1", "1e-6", "1E3", "NaN", "nan", "inf", "Infinity", ".5", "1.", "1,5", "1 0",
     "0x10", "1_000", "٣", "0.0000000000001", "1000.000000000001", "1001", "9" * 41, "0." + "0" * 40],
)  # fmt: skip
def test_bad_per_token_rates_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"decimal|longer|above"):
        Prices.parse_per_token(text)


def test_per_million_prices_name_the_bad_kind() -> None:
    with pytest.raises(ValueError, match="output"):
        Prices.parse_per_million({"input": "1", "output": "1.0000001"})
    with pytest.raises(ValueError, match="audio"):
        Prices.parse_per_million({"audio": "1"})


def test_price_book_most_specific_first() -> None:
    model = Prices({"input": 1, "output": 2})
    gold = Prices({"input": 9, "output": 9})
    book = PriceBook(
        {"granite": ModelPrices(model, {"ns/gold": gold})},
        default=ModelPrices(Prices({"input": 7})),
    )
    rate = Prices.flat(5)
    assert book.prices_for("granite", "ns/gold", rate) == gold
    assert book.prices_for("granite", "ns/silver", rate) == rate
    assert book.prices_for("granite", "ns/silver") == model
    assert book.prices_for("other", "free") == Prices({"input": 7})
    assert PriceBook().prices_for("granite", "free") is None
    assert PriceBook().prices_for("granite", "ns/x", rate) == rate


def test_the_ledger_entry_keeps_not_reported_apart_from_zero() -> None:
    usage = Usage(10, 5, 15, cached_tokens=0, reasoning_tokens=None, cache_creation_tokens=3)
    charge = Charge("u", "free", "m", usage, cost_micros=42, priced=True)
    entry = ledger.entry_for(charge, 0)
    assert (entry.cached_tokens, entry.cached_reported) == (0, 1)
    assert (entry.reasoning_tokens, entry.reasoning_reported) == (0, 0)
    assert (entry.cache_creation_tokens, entry.cache_creation_reported) == (3, 1)
    assert (entry.cost_micros, entry.priced_requests) == (42, 1)
    written = dict(ledger.entry_fields(entry))
    by_model = {f: a for f, a in written.items() if not keys.is_ledger_total(f)}
    # the hash's totals (listings read those) mirror what the entry adds
    assert {f: a for f, a in written.items() if keys.is_ledger_total(f)} == {
        f.split("|", 1)[1]: a for f, a in by_model.items()
    }
    assert by_model == {
        "m|prompt": 10,
        "m|completion": 5,
        "m|total": 15,
        "m|estimated": 0,
        "m|requests": 1,
        "m|cache_creation": 3,
        "m|cost": 42,
        "m|cached_n": 1,
        "m|cache_creation_n": 1,
        "m|priced": 1,
    }
    plain = ledger.entry_for(Charge("u", "free", "m", Usage(1, 1, 2)), 0)
    # as few model fields as before issue #16 (and their totals)
    assert len(ledger.entry_fields(plain)) == 2 * 5


# --- the configured price book and the charge's cost --------------------------------------

PRICING = {
    "models": {
        "granite": {
            "input": "3",
            "cached_input": "0.30",
            "cache_creation": "3.75",
            "output": "15.00",
            "plans": {"premium": {"input": "2.4"}, "ns/gold": {"output": 12}},
        },
    },
    "default": {"input": "0.5", "output": "1.5"},
}


def test_pricing_config_is_read_into_integer_prices() -> None:
    book = config.parse({"pricing": PRICING}, serving=False).pricing
    granite = book.prices_for("granite", "free")
    assert granite is not None
    assert [granite.of(k) for k in BILLED_KINDS] == [
        3_000_000, 300_000, 3_750_000, 15_000_000, 15_000_000
    ]  # fmt: skip
    premium = book.prices_for("granite", "premium")
    assert premium is not None
    assert [premium.of(k) for k in BILLED_KINDS] == [
        2_400_000,
        300_000,
        3_750_000,
        15_000_000,
        15_000_000,
    ]  # fmt: skip: the override keeps the model's other kinds
    gold = book.prices_for("granite", "ns/gold", Prices.flat(1))
    assert gold is not None
    assert gold.of("output") == 12_000_000
    other = book.prices_for("other", "free")
    assert other is not None
    assert (other.of("cached_input"), other.of("reasoning")) == (500_000, 1_500_000)
    assert config.parse({}, serving=False).pricing == PriceBook()


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"models": {"m": {"input": "1"}}}, "pricing.models.m.output"),
        ({"models": {"m": {"input": 1.5, "output": "1"}}}, "pricing.models.m.input"),
        ({"models": {"m": {"input": "-1", "output": "1"}}}, "pricing.models.m.input"),
        ({"models": {"m": {"input": "1e3", "output": "1"}}}, "pricing.models.m.input"),
        ({"models": {"m": {"input": "nan", "output": "1"}}}, "pricing.models.m.input"),
        ({"models": {"m": {"input": True, "output": "1"}}}, "pricing.models.m.input"),
        ({"models": {"m": {"input": "0.0000001", "output": "1"}}}, "pricing.models.m.input"),
        ({"models": {"m": {"input": "1", "output": "9" * 30}}}, "pricing.models.m.output"),
        ({"models": {"m": {"input": "1", "output": "1", "audio": "1"}}}, "pricing.models.m.audio"),
        (
            {"models": {"m": {"input": "1", "output": "1", "plans": {"p": {"x": 1}}}}},
            "pricing.models.m.plans.p.x",
        ),
        (
            {"models": {"m": {"input": "1", "output": "1", "plans": {"p": "1"}}}},
            "pricing.models.m.plans.p",
        ),
        ({"models": ["m"]}, "pricing.models"),
        ({"currency": "EUR"}, "pricing.currency"),
        ({"default": {"output": "1"}}, "pricing.default.input"),
    ],
)
def test_bad_pricing_config_names_the_key(raw: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.parse({"pricing": raw}, serving=False)
    assert caught.value.key == key


def test_a_charge_is_priced_by_model_plan_and_billing_rate() -> None:
    book = config.parse({"pricing": PRICING}, serving=False).pricing
    usage = Usage(1000, 100, 1100, cached_tokens=800, reasoning_tokens=40)
    tier = pricing.priced(Charge("u", "free", "granite", usage), book)
    assert (tier.cost_micros, tier.priced) == (200 * 3 + 800 * 3 // 10 + 100 * 15, True)
    rate = 2_000_000  # billingRate.perToken "0.000002": 2 micro-units a token
    sub = Charge("u", "", "ns/llm", usage, subscription="ns/silver", billing_rate=rate)
    assert pricing.priced(sub, book).cost_micros == 1100 * 2
    unpriced = pricing.priced(Charge("u", "free", "other", usage), PriceBook())
    assert (unpriced.cost_micros, unpriced.priced) == (0, False)
    # A charge that names no model is booked (and priced) as "unknown".
    unknown = PriceBook({"unknown": ModelPrices(Prices.flat(10**6))})
    assert pricing.priced(Charge("u", "free", "", usage), unknown).cost_micros == 1100


def test_the_readme_example_is_true() -> None:
    """README "Token kinds and cost": its pricing block parses, and its worked example holds."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Token kinds and cost", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    book = config.parse(yaml.safe_load(block), serving=False).pricing
    usage = Usage(1000, 300, 1300, cached_tokens=800, reasoning_tokens=100)
    charge = pricing.priced(Charge("u", "free", "granite-3-8b", usage), book)
    assert (charge.cost_micros, charge.priced) == (5340, True)
    assert "5,340 micro-units (0.00534)" in " ".join(section.split())
