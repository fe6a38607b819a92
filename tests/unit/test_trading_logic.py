"""calculate_trade_composition: exact Decimal sizing, each refusal, and properties over
thousands of generated indices, sizes and filters."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from service.trading_logic import (
    ComponentWeight,
    Direction,
    InvalidSizeError,
    LegOutOfRangeError,
    MarketDataError,
    Side,
    calculate_trade_composition,
    tradeable_size_range,
)

D = Decimal


@dataclass(frozen=True)
class Filters:
    symbol: str
    qty_step: Decimal = Decimal("0.001")  # immutable
    min_order_qty: Decimal = Decimal("0.001")
    max_mkt_order_qty: Decimal = Decimal("100")
    min_notional_value: Decimal = Decimal("5")
    status: str = "Trading"


BLUECHIP = [ComponentWeight("BTCUSDT", D("0.6")), ComponentWeight("ETHUSDT", D("0.4"))]
FILTERS = {
    "BTCUSDT": Filters("BTCUSDT"),
    "ETHUSDT": Filters(
        "ETHUSDT", qty_step=D("0.01"), min_order_qty=D("0.01"), max_mkt_order_qty=D("1000")
    ),
}
PRICES = {"BTCUSDT": D("95000"), "ETHUSDT": D("3500")}


def test_sizes_each_leg_and_rounds_down_to_the_step() -> None:
    legs = calculate_trade_composition(BLUECHIP, D("1000"), Direction.LONG, FILTERS, PRICES)
    assert [(leg.leg, leg.symbol, leg.side, leg.quantity) for leg in legs] == [
        (0, "BTCUSDT", Side.BUY, D("0.006")),  # 600 / 95000 = 0.006315… → 0.006
        (1, "ETHUSDT", Side.BUY, D("0.11")),  # 400 / 3500 = 0.1142… → 0.11
    ]
    assert legs[0].target_notional == D("600")
    assert legs[0].notional == D("570.000")
    # Plain decimals for Bybit, never exponents.
    assert format(legs[1].quantity, "f") == "0.11"


def test_short_sells_every_component() -> None:
    legs = calculate_trade_composition(BLUECHIP, D("1000"), Direction.SHORT, FILTERS, PRICES)
    assert {leg.side for leg in legs} == {Side.SELL}


def test_too_small_names_the_leg_the_limit_and_the_smallest_size() -> None:
    with pytest.raises(LegOutOfRangeError) as caught:
        calculate_trade_composition(BLUECHIP, D("50"), Direction.LONG, FILTERS, PRICES)
    error = caught.value
    assert (error.leg, error.symbol, error.limit) == (0, "BTCUSDT", "minOrderQty")
    assert error.limit_value == D("0.001")
    assert error.suggested_size == D("158.34")
    assert "smallest size that can be traded is 158.34" in error.message
    calculate_trade_composition(BLUECHIP, error.suggested_size, Direction.LONG, FILTERS, PRICES)
    with pytest.raises(LegOutOfRangeError):
        calculate_trade_composition(
            BLUECHIP, error.suggested_size - D("0.01"), Direction.LONG, FILTERS, PRICES
        )


def test_min_notional_is_enforced() -> None:
    filters = {**FILTERS, "ETHUSDT": Filters("ETHUSDT", min_notional_value=D("500"))}
    with pytest.raises(LegOutOfRangeError) as caught:
        calculate_trade_composition(BLUECHIP, D("1000"), Direction.LONG, filters, PRICES)
    assert caught.value.limit == "minNotionalValue"
    assert caught.value.symbol == "ETHUSDT"


def test_too_large_names_the_largest_size() -> None:
    with pytest.raises(LegOutOfRangeError) as caught:
        calculate_trade_composition(BLUECHIP, D("20000000"), Direction.LONG, FILTERS, PRICES)
    error = caught.value
    assert (error.symbol, error.limit) == ("BTCUSDT", "maxMktOrderQty")
    assert "largest size that can be traded" in error.message
    calculate_trade_composition(BLUECHIP, error.suggested_size, Direction.LONG, FILTERS, PRICES)
    with pytest.raises(LegOutOfRangeError):
        calculate_trade_composition(
            BLUECHIP, error.suggested_size + D("0.01"), Direction.LONG, FILTERS, PRICES
        )


@pytest.mark.parametrize(
    ("filters", "prices", "fragment"),
    [
        ({"BTCUSDT": FILTERS["BTCUSDT"]}, PRICES, "no instrument filters for ETHUSDT"),
        (FILTERS, {"BTCUSDT": D("95000")}, "no price for ETHUSDT"),
        (FILTERS, {**PRICES, "ETHUSDT": D("0")}, "not a positive decimal"),
        (
            {**FILTERS, "ETHUSDT": Filters("ETHUSDT", status="Closed")},
            PRICES,
            "ETHUSDT is not trading",
        ),
    ],
)
def test_missing_or_bad_market_data_is_refused(
    filters: dict[str, Filters], prices: dict[str, Decimal], fragment: str
) -> None:
    with pytest.raises(MarketDataError, match=fragment):
        calculate_trade_composition(BLUECHIP, D("1000"), Direction.LONG, filters, prices)


@pytest.mark.parametrize("size", [D("0"), D("-1"), D("NaN"), D("Infinity"), 1000, 1000.0])
def test_invalid_sizes_are_refused(size: object) -> None:
    with pytest.raises(InvalidSizeError):
        calculate_trade_composition(BLUECHIP, size, Direction.LONG, FILTERS, PRICES)  # type: ignore[arg-type]


def test_tradeable_range_matches_the_composition() -> None:
    bounds = tradeable_size_range(BLUECHIP, FILTERS, PRICES)
    assert bounds.min_size == D("158.34")
    calculate_trade_composition(BLUECHIP, bounds.max_size, Direction.LONG, FILTERS, PRICES)


# ---- properties ---------------------------------------------------------------------------

STEPS = [D("0.001"), D("0.01"), D("0.1"), D("1"), D("10")]
# Some generated baskets cannot be traded at any size (one leg's minimum above another's
# maximum) and are skipped; a fixed seed keeps CI runs identical.
_FILTERING = [HealthCheck.filter_too_much, HealthCheck.too_slow]


@st.composite
def markets(draw: st.DrawFn) -> tuple[list[ComponentWeight], dict[str, Filters], dict[str, D]]:
    count = draw(st.integers(min_value=2, max_value=10))
    # Exact weights: integer parts of a whole.
    parts = draw(st.lists(st.integers(min_value=1, max_value=100), min_size=count, max_size=count))
    total = sum(parts)
    weights = [D(p) / D(total) for p in parts[:-1]]
    weights.append(D(1) - sum(weights))
    components, filters, prices = [], {}, {}
    for number, weight in enumerate(weights):
        symbol = f"S{number}USDT"
        step = draw(st.sampled_from(STEPS))
        min_qty = step * draw(st.integers(min_value=1, max_value=5))
        max_qty = step * draw(st.integers(min_value=10_000, max_value=10_000_000))
        price = draw(st.decimals(min_value=D("0.0001"), max_value=D("100000"), places=4))
        components.append(ComponentWeight(symbol, weight))
        filters[symbol] = Filters(
            symbol,
            qty_step=step,
            min_order_qty=min_qty,
            max_mkt_order_qty=max_qty,
            min_notional_value=draw(st.sampled_from([D(0), D(1), D(5)])),
        )
        prices[symbol] = price
    return components, filters, prices


sizes = st.decimals(min_value=D("1"), max_value=D("10000000"), places=2)
fractions = st.decimals(min_value=D(0), max_value=D(1), places=6)


@settings(max_examples=2000, deadline=None, derandomize=True, suppress_health_check=_FILTERING)
@given(market=markets(), fraction=fractions)
def test_every_accepted_basket_respects_steps_limits_and_size(
    market: tuple[list[ComponentWeight], dict[str, Filters], dict[str, D]], fraction: D
) -> None:
    components, filters, prices = market
    bounds = tradeable_size_range(components, filters, prices)
    assume(bounds.min_size <= bounds.max_size)
    # A size anywhere in the tradeable range, to the cent.
    size = (bounds.min_size + (bounds.max_size - bounds.min_size) * fraction).quantize(D("0.01"))
    legs = calculate_trade_composition(components, size, Direction.LONG, filters, prices)
    slack = D(0)
    for leg in legs:
        rules = filters[leg.symbol]
        assert leg.quantity % rules.qty_step == 0
        assert rules.min_order_qty <= leg.quantity <= rules.max_mkt_order_qty
        assert leg.notional >= rules.min_notional_value
        assert leg.notional <= leg.target_notional
        # Short of its share by less than one step's value.
        assert leg.target_notional - leg.notional < rules.qty_step * leg.reference_price
        slack += rules.qty_step * leg.reference_price
    basket = sum((leg.notional for leg in legs), D(0))
    assert basket <= size
    assert size - basket < slack


@settings(max_examples=1000, deadline=None, derandomize=True, suppress_health_check=_FILTERING)
@given(market=markets(), size=sizes)
def test_long_and_short_are_mirror_images(
    market: tuple[list[ComponentWeight], dict[str, Filters], dict[str, D]], size: D
) -> None:
    components, filters, prices = market
    try:
        long = calculate_trade_composition(components, size, Direction.LONG, filters, prices)
    except LegOutOfRangeError:
        with pytest.raises(LegOutOfRangeError):
            calculate_trade_composition(components, size, Direction.SHORT, filters, prices)
        return
    short = calculate_trade_composition(components, size, Direction.SHORT, filters, prices)
    assert [(leg.symbol, leg.quantity) for leg in long] == [
        (leg.symbol, leg.quantity) for leg in short
    ]
    assert {leg.side for leg in long} == {Side.BUY}
    assert {leg.side for leg in short} == {Side.SELL}


@settings(max_examples=1000, deadline=None, derandomize=True, suppress_health_check=_FILTERING)
@given(market=markets(), size=sizes)
def test_refusals_suggest_a_size_that_works(
    market: tuple[list[ComponentWeight], dict[str, Filters], dict[str, D]], size: D
) -> None:
    components, filters, prices = market
    bounds = tradeable_size_range(components, filters, prices)
    assume(bounds.min_size <= bounds.max_size)
    try:
        calculate_trade_composition(components, size, Direction.LONG, filters, prices)
        assert bounds.min_size <= size <= bounds.max_size
    except LegOutOfRangeError as error:
        assert not bounds.min_size <= size <= bounds.max_size
        suggested = error.suggested_size
        calculate_trade_composition(components, suggested, Direction.LONG, filters, prices)
        step_back = suggested - D("0.01") if size < suggested else suggested + D("0.01")
        with pytest.raises(LegOutOfRangeError):
            calculate_trade_composition(components, step_back, Direction.LONG, filters, prices)
