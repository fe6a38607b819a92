"""value_basket: every field of hand-computed baskets, the edge cases, and properties of PnL,
slippage, rounding and weights over generated fills and prices."""

from __future__ import annotations

import decimal
from collections.abc import Sequence
from dataclasses import fields
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from service.positions.valuation import (
    BasketValue,
    Fill,
    LegInput,
    LegValue,
    value_basket,
)

D = Decimal
EXACT = decimal.Context(prec=50)
UNIT = D("1E-8")


def usdt(quantity: str, price: str, fee: str | None = None, coin: str | None = None) -> Fill:
    return Fill(D(quantity), D(price), None if fee is None else D(fee), coin)


def leg(
    number: int = 0,
    *,
    side: str = "Buy",
    opening: Sequence[Fill] = (),
    closing: Sequence[Fill] = (),
    mark: str | None = None,
    weight: str | None = "1",
    planned: str = "1",
    reference: str = "100",
    symbol: str = "BTCUSDT",
) -> LegInput:
    return LegInput(
        leg=number,
        symbol=symbol,
        side=side,
        target_weight=None if weight is None else D(weight),
        planned_quantity=D(planned),
        reference_price=D(reference),
        opening=opening,
        closing=closing,
        mark_price=None if mark is None else D(mark),
    )


# -- hand-computed baskets ---------------------------------------------------------------------

# Long BTC: planned 0.010 at 60000, filled 0.004 @ 60010 and 0.006 @ 60030, then 0.004 closed
# @ 61000, mark now 61500. Fees are 0.055 % of each fill's notional, in USDT.
BTC_LONG = leg(
    0,
    symbol="BTCUSDT",
    side="Buy",
    weight="0.6",
    planned="0.010",
    reference="60000",
    opening=[usdt("0.004", "60010", "0.132022"), usdt("0.006", "60030", "0.198099")],
    closing=[usdt("0.004", "61000", "0.1342")],
    mark="61500",
)
# Short ETH: planned 0.13 at 3000, sold 0.05 @ 2995 (fee unknown) and 0.08 @ 2990, then bought
# back whole: 0.07 @ 2900 (fee in USDT) and 0.06 @ 2950 (fee 0.5 MNT). No mark: nothing held.
ETH_SHORT = leg(
    1,
    symbol="ETHUSDT",
    side="Sell",
    weight="0.4",
    planned="0.13",
    reference="3000",
    opening=[usdt("0.05", "2995"), usdt("0.08", "2990", "0.13156", "USDT")],
    closing=[usdt("0.07", "2900", "0.11165"), usdt("0.06", "2950", "0.5", "MNT")],
    mark=None,
)


def test_long_partial_close_and_short_full_close_by_hand() -> None:
    basket = value_basket([BTC_LONG, ETH_SHORT])
    btc, eth = basket.legs

    assert btc == LegValue(
        leg=0,
        symbol="BTCUSDT",
        side="Buy",
        target_weight=D("0.600000"),  # 0.6 / (0.6 + 0.4)
        planned_weight=D("0.606061"),  # 0.010·60000 = 600; 600 / (600 + 390) = 0.6060606…
        filled_weight=D("0.606792"),  # 600.22 / (600.22 + 388.95) = 0.60679155…
        planned_quantity=D("0.010"),
        filled_quantity=D("0.010"),  # 0.004 + 0.006
        closed_quantity=D("0.004"),
        held_quantity=D("0.006"),  # 0.010 - 0.004
        reference_price=D("60000"),
        average_entry_price=D("60022.00000000"),  # (240.04 + 360.18) / 0.010 = 600.22 / 0.010
        slippage_bps=D("3.67"),  # +(60022 - 60000) / 60000 · 10000 = 3.666…
        average_exit_price=D("61000.00000000"),
        mark_price=D("61500"),
        entry_notional=D("600.22000000"),  # 0.004·60010 + 0.006·60030
        current_value=D("369.00000000"),  # 0.006 · 61500
        unrealised_pnl=D("8.86800000"),  # 369 - 600.22·0.006/0.010 = 369 - 360.132
        realised_pnl=D("3.91200000"),  # 0.004·61000 - 600.22·0.004/0.010 = 244 - 240.088
        fees=D("0.46432100"),  # 0.132022 + 0.198099 + 0.1342
    )
    assert eth == LegValue(
        leg=1,
        symbol="ETHUSDT",
        side="Sell",
        target_weight=D("0.400000"),
        planned_weight=D("0.393939"),  # 0.13·3000 = 390; 390 / 990 = 0.3939393…
        filled_weight=D("0.393208"),  # 388.95 / 989.17 = 0.39320844…
        planned_quantity=D("0.13"),
        filled_quantity=D("0.13"),  # 0.05 + 0.08
        closed_quantity=D("0.13"),  # 0.07 + 0.06
        held_quantity=D("0"),
        reference_price=D("3000"),
        average_entry_price=D("2991.92307692"),  # (149.75 + 239.2) / 0.13 = 2991.923076923…
        # -(2991.923076923… - 3000) / 3000 · 10000 = 26.923…: sold below the reference.
        slippage_bps=D("26.92"),
        average_exit_price=D("2923.07692308"),  # (203 + 177) / 0.13 = 2923.076923076…
        mark_price=None,
        entry_notional=D("388.95000000"),
        current_value=D("0E-8"),  # nothing held: 0 even without a mark
        unrealised_pnl=D("0E-8"),
        realised_pnl=D("8.95000000"),  # -(380 - 388.95): bought back cheaper
        fees=D("0.24321000"),  # None counts 0; 0.13156 + 0.11165; the MNT fee is apart
    )
    assert basket == BasketValue(
        legs=[btc, eth],
        entry_notional=D("989.17000000"),  # 600.22 + 388.95
        current_value=D("369.00000000"),  # 369 + 0
        unrealised_pnl=D("8.86800000"),  # 8.868 + 0
        realised_pnl=D("12.86200000"),  # 3.912 + 8.95
        fees=D("0.70753100"),  # 0.464321 + 0.24321
        fees_other={"MNT": D("0.50000000")},
        net_pnl=D("21.02246900"),  # 12.862 + 8.868 - 0.707531
    )
    # Equal Decimals can differ in exponent: the rounded outputs carry their unit.
    assert str(btc.average_entry_price) == "60022.00000000"
    assert str(btc.slippage_bps) == "3.67"
    assert str(btc.filled_weight) == "0.606792"
    assert str(eth.held_quantity) == "0.00"  # 0.13 - 0.13, as summed


def test_short_partial_close_with_the_mark_against_it_by_hand() -> None:
    # Sold 0.05 @ 2995 and 0.08 @ 2990 (cost 388.95), bought back 0.03 @ 2900, mark now 3010.
    short = leg(
        side="Sell",
        opening=[usdt("0.05", "2995"), usdt("0.08", "2990")],
        closing=[usdt("0.03", "2900", "-0.001")],  # a rebate
        mark="3010",
        reference="3000",
        planned="0.13",
    )
    basket = value_basket([short])
    (eth,) = basket.legs
    assert eth.held_quantity == D("0.10")
    # -(0.03·2900 - 388.95·0.03/0.13) = -(87 - 89.7576923076…) = 2.7576923076…
    assert eth.realised_pnl == D("2.75769231")
    # -(0.10·3010 - 388.95·0.10/0.13) = -(301 - 299.1923076923…) = -1.8076923076…
    assert eth.unrealised_pnl == D("-1.80769231")
    assert eth.current_value == D("301.00000000")
    assert eth.fees == D("-0.00100000")
    assert (eth.filled_weight, eth.planned_weight, eth.target_weight) == (D(1), D(1), D(1))
    # Both together: -(87 + 301 - 388.95) = 0.95; net adds the rebate back.
    assert basket.unrealised_pnl is not None
    assert basket.realised_pnl + basket.unrealised_pnl == D("0.95")
    assert basket.net_pnl == D("0.95100000")


# -- edge cases --------------------------------------------------------------------------------


def test_held_leg_without_a_mark_makes_the_basket_value_unknown() -> None:
    basket = value_basket(
        [
            leg(0, opening=[usdt("1", "100")], mark="110"),
            leg(1, opening=[usdt("2", "50")], mark=None, symbol="ETHUSDT"),
        ]
    )
    assert basket.legs[0].unrealised_pnl == D("10.00000000")
    assert basket.legs[1].current_value is None
    assert basket.legs[1].unrealised_pnl is None
    assert basket.current_value is None
    assert basket.unrealised_pnl is None
    assert basket.net_pnl is None
    assert basket.realised_pnl == 0
    assert basket.entry_notional == D("200.00000000")


def test_nothing_filled_anywhere() -> None:
    basket = value_basket(
        [leg(0, weight="3", planned="2"), leg(1, weight=None, planned="6", symbol="ETHUSDT")]
    )
    for value in basket.legs:
        assert value.filled_weight is None
        assert value.average_entry_price is None
        assert value.slippage_bps is None
        assert value.average_exit_price is None
        assert value.filled_quantity == value.closed_quantity == value.held_quantity == 0
        assert value.current_value == value.unrealised_pnl == value.realised_pnl == 0
    assert [value.target_weight for value in basket.legs] == [D("1.000000"), None]
    assert [value.planned_weight for value in basket.legs] == [D("0.250000"), D("0.750000")]
    assert basket.net_pnl == 0
    assert basket.fees_other == {}


def test_weights_are_none_when_their_sum_is_zero() -> None:
    basket = value_basket([leg(0, weight="0", planned="0"), leg(1, weight=None, planned="0")])
    assert [(v.target_weight, v.planned_weight) for v in basket.legs] == [(None, None)] * 2


def test_an_empty_basket_is_worth_zero() -> None:
    assert value_basket([]) == BasketValue(
        legs=[],
        entry_notional=D(0),
        current_value=D(0),
        unrealised_pnl=D(0),
        realised_pnl=D(0),
        fees=D(0),
        fees_other={},
        net_pnl=D(0),
    )


def test_closing_more_than_was_opened_realises_only_what_was_held() -> None:
    # Filled 1 @ 100, "closed" 2 @ 110: held is 0, realised on 1 at the exit average 110.
    value = value_basket(
        [leg(opening=[usdt("1", "100")], closing=[usdt("2", "110")], mark=None)]
    ).legs[0]
    assert value.held_quantity == 0
    assert value.closed_quantity == D("2")
    assert value.realised_pnl == D("10.00000000")
    assert value.unrealised_pnl == 0
    assert value.current_value == 0
    # A close with no opening at all realises nothing.
    orphan = value_basket([leg(closing=[usdt("1", "110")])]).legs[0]
    assert orphan.realised_pnl == 0
    assert orphan.held_quantity == 0


def test_fee_coins() -> None:
    value = value_basket(
        [
            leg(
                opening=[usdt("1", "100", "0.1"), usdt("1", "100", "0.2", "USDT")],
                closing=[
                    usdt("1", "100", "0.3", ""),
                    usdt("0.5", "100", "0.00001", "BTC"),
                    usdt("0.5", "100", None, "BNB"),
                ],
                mark="100",
            )
        ]
    )
    assert value.legs[0].fees == D("0.60000000")
    assert value.fees == D("0.60000000")
    assert value.fees_other == {"BTC": D("0.00001000")}


def test_zero_short_pnl_is_not_negative_zero() -> None:
    value = value_basket([leg(side="Sell", opening=[usdt("1", "100")], mark="100")]).legs[0]
    assert str(value.unrealised_pnl) == "0E-8"
    assert str(value.realised_pnl) == "0E-8"


@pytest.mark.parametrize(
    "bad",
    [
        leg(side="Long"),
        leg(reference="0"),
        leg(planned="-1"),
        leg(weight="-0.1"),
        leg(mark="0"),
        leg(mark="NaN"),
        leg(opening=[usdt("-1", "100")]),
        leg(opening=[usdt("1", "0")]),
        leg(closing=[usdt("1", "Infinity")]),
        leg(opening=[usdt("1", "100", "sNaN")]),
    ],
)
def test_invalid_input_is_refused(bad: LegInput) -> None:
    with pytest.raises(ValueError, match="leg 0"):
        value_basket([bad])


def test_floats_are_refused() -> None:
    with pytest.raises(TypeError, match="Decimal"):
        value_basket([leg(opening=[Fill(1.5, D(100), None, None)])])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Decimal"):
        value_basket([LegInput(0, "X", "Buy", None, D(1), D(100), [], [], 100.0)])  # type: ignore[arg-type]


def test_a_zero_quantity_fill_is_ignored_whatever_its_price() -> None:
    value = value_basket([leg(opening=[usdt("0", "0"), usdt("2", "100")], mark="100")]).legs[0]
    assert value.filled_quantity == D("2")
    assert value.average_entry_price == D("100.00000000")


# -- properties --------------------------------------------------------------------------------

prices = st.decimals(
    min_value=D("0.0001"), max_value=D("100000"), places=4, allow_nan=False, allow_infinity=False
)
quantities = st.decimals(
    min_value=D("0.001"), max_value=D("10000"), places=3, allow_nan=False, allow_infinity=False
)
fees = st.decimals(
    min_value=D("-10"), max_value=D("100"), places=8, allow_nan=False, allow_infinity=False
)
weights = st.decimals(
    min_value=D("0"), max_value=D("10"), places=6, allow_nan=False, allow_infinity=False
)
sides = st.sampled_from(["Buy", "Sell"])
fills = st.builds(
    Fill,
    quantity=quantities,
    price=prices,
    fee=st.none() | fees,
    fee_coin=st.sampled_from([None, "USDT", "BNB", "MNT"]),
)
fill_lists = st.lists(fills, min_size=1, max_size=5)
PROPERTY = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def sign_of(side: str) -> Decimal:
    return D(1) if side == "Buy" else D(-1)


def quantity_of(fills: Sequence[Fill]) -> Decimal:
    return sum((fill.quantity for fill in fills), D(0))


def cost_of(fills: Sequence[Fill]) -> Decimal:
    return sum((EXACT.multiply(fill.quantity, fill.price) for fill in fills), D(0))


def split(total: Decimal, cut: Decimal, first: Decimal, second: Decimal) -> list[Fill]:
    """`total` closed in (up to) two fills: `cut` at `first`, the rest at `second`."""
    return [
        Fill(quantity, price, None, None)
        for quantity, price in ((cut, first), (total - cut, second))
        if quantity > 0
    ]


def single(
    side: str, opening: Sequence[Fill], closing: Sequence[Fill], mark: Decimal | None
) -> LegValue:
    return value_basket(
        [LegInput(0, "BTCUSDT", side, D(1), D(1), D(100), opening, closing, mark)]
    ).legs[0]


@PROPERTY
@given(side=sides, opening=fill_lists, data=st.data(), first=prices, second=prices)
def test_a_full_close_realises_exactly_exit_minus_entry(
    side: str, opening: list[Fill], data: st.DataObject, first: Decimal, second: Decimal
) -> None:
    filled = quantity_of(opening)
    cut = data.draw(st.decimals(min_value=D(0), max_value=filled, places=3))
    closing = split(filled, cut, first, second)
    value = single(side, opening, closing, data.draw(st.none() | prices))
    expected = sign_of(side) * (cost_of(closing) - cost_of(opening))
    assert value.realised_pnl == expected.quantize(UNIT)
    assert value.held_quantity == 0
    assert value.unrealised_pnl == 0
    assert value.current_value == 0


@PROPERTY
@given(side=sides, opening=fill_lists)
def test_no_pnl_at_the_average_entry(side: str, opening: list[Fill]) -> None:
    exact_average = EXACT.divide(cost_of(opening), quantity_of(opening))
    value = single(side, opening, [], exact_average)
    assert value.realised_pnl == 0
    assert value.unrealised_pnl is not None
    assert abs(value.unrealised_pnl) <= UNIT
    # At the rounded average, off by at most held · half a price unit, plus the money rounding.
    assert value.average_entry_price is not None
    rounded = single(side, opening, [], value.average_entry_price)
    assert rounded.unrealised_pnl is not None
    assert abs(rounded.unrealised_pnl) <= value.held_quantity * UNIT / 2 + UNIT / 2


@PROPERTY
@given(opening=fill_lists, closing=st.lists(fills, max_size=4), mark=st.none() | prices)
def test_long_and_short_mirror_each_other(
    opening: list[Fill], closing: list[Fill], mark: Decimal | None
) -> None:
    long = single("Buy", opening, closing, mark)
    short = single("Sell", opening, closing, mark)
    assert long.realised_pnl == -short.realised_pnl
    if long.unrealised_pnl is None:
        assert short.unrealised_pnl is None
    else:
        assert short.unrealised_pnl == -long.unrealised_pnl
    assert long.slippage_bps is not None
    assert short.slippage_bps == -long.slippage_bps
    same = ("average_entry_price", "average_exit_price", "current_value", "fees", "held_quantity")
    assert [getattr(long, name) for name in same] == [getattr(short, name) for name in same]


@PROPERTY
@given(side=sides, opening=fill_lists, data=st.data(), mark=prices)
def test_a_partial_close_at_the_mark_adds_up_to_the_whole_at_the_mark(
    side: str, opening: list[Fill], data: st.DataObject, mark: Decimal
) -> None:
    filled = quantity_of(opening)
    assume(filled >= D("0.002"))
    closed = data.draw(st.decimals(min_value=D("0.001"), max_value=filled - D("0.001"), places=3))
    cut = data.draw(st.decimals(min_value=D(0), max_value=closed, places=3))
    value = single(side, opening, split(closed, cut, mark, mark), mark)
    assert value.held_quantity == filled - closed
    assert value.unrealised_pnl is not None
    whole = sign_of(side) * (EXACT.multiply(mark, filled) - cost_of(opening))
    assert abs(value.realised_pnl + value.unrealised_pnl - whole) <= UNIT


@st.composite
def baskets(draw: st.DrawFn) -> list[LegInput]:
    return [
        LegInput(
            leg=number,
            symbol=f"SYM{number}USDT",
            side=draw(sides),
            target_weight=draw(st.none() | weights),
            planned_quantity=draw(quantities),
            reference_price=draw(prices),
            opening=draw(st.lists(fills, max_size=4)),
            closing=draw(st.lists(fills, max_size=3)),
            mark_price=draw(st.none() | prices),
        )
        for number in range(draw(st.integers(min_value=1, max_value=6)))
    ]


def no_floats(value: object) -> None:
    assert not isinstance(value, float)
    if isinstance(value, list):
        for item in value:
            no_floats(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            no_floats(key)
            no_floats(item)
    elif isinstance(value, LegValue | BasketValue):
        for field in fields(value):
            no_floats(getattr(value, field.name))


def places_at_most(value: Decimal | None, places: int) -> None:
    if value is not None:
        assert type(value) is Decimal
        assert value.is_finite()
        exponent = value.as_tuple().exponent
        assert isinstance(exponent, int)
        assert exponent >= -places


MONEY = ("entry_notional", "current_value", "unrealised_pnl", "realised_pnl", "fees")


@PROPERTY
@given(legs=baskets())
def test_outputs_are_rounded_decimals_and_never_floats(legs: list[LegInput]) -> None:
    basket = value_basket(legs)
    no_floats(basket)
    for value, source in zip(basket.legs, legs, strict=True):
        for name in (*MONEY, "average_entry_price", "average_exit_price"):
            places_at_most(getattr(value, name), 8)
        places_at_most(value.slippage_bps, 2)
        for name in ("target_weight", "planned_weight", "filled_weight"):
            places_at_most(getattr(value, name), 6)
        # Quantities are the exact sums.
        assert value.filled_quantity == quantity_of(source.opening)
        assert value.closed_quantity == quantity_of(source.closing)
        assert value.held_quantity == max(value.filled_quantity - value.closed_quantity, D(0))
    for name in (*MONEY, "net_pnl"):
        places_at_most(getattr(basket, name), 8)
    for fee in basket.fees_other.values():
        places_at_most(fee, 8)
    # Totals are rounded once: within half a unit per leg of the sum of the rounded legs.
    slack = UNIT / 2 * (len(legs) + 1)
    for name in MONEY:
        total = getattr(basket, name)
        parts = [getattr(value, name) for value in basket.legs]
        if total is None:
            assert None in parts
        else:
            assert abs(total - sum(parts, D(0))) <= slack


@PROPERTY
@given(legs=baskets())
def test_weights_of_each_kind_sum_to_one(legs: list[LegInput]) -> None:
    basket = value_basket(legs)
    for name in ("target_weight", "planned_weight", "filled_weight"):
        defined = [getattr(value, name) for value in basket.legs]
        present = [weight for weight in defined if weight is not None]
        if present:
            assert abs(sum(present, D(0)) - 1) <= D("1E-5")
    anything_filled = any(source.opening for source in legs)
    assert all((value.filled_weight is not None) == anything_filled for value in basket.legs)
