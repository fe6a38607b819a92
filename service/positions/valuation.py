"""value_basket: what a synthetic basket position is worth and how well it was executed.

Pure Decimal arithmetic on values passed in; no I/O, no floats (the working context traps any
mixing of float and Decimal).

Per leg, with sign = +1 for a "Buy" (long) leg and -1 for a "Sell" (short) leg:

- filled = Σq over the opening fills, closed = Σq over the closing fills,
  held = max(filled - closed - closed_elsewhere, 0) (closed_elsewhere: what the exchange no
  longer held when a close tried the leg; no PnL is counted on it, its price is not known).
- cost = Σq·p over the opening fills (`entry_notional`); average_entry = cost / filled;
  average_exit = Σq·p / closed over the closing fills.
- slippage_bps = sign · (average_entry - reference) / reference · 10000: positive is worse for
  the user (paid more on a buy, received less on a sell).
- unrealised_pnl = sign · held · (mark - entry) = sign · (held · mark - cost · held / filled);
  realised_pnl = sign · closed · (exit - entry) = sign · (proceeds - cost · closed / filled),
  proceeds being Σq·p over the closing fills. `entry` is the exact average: the cost basis is
  scaled by a share of the quantity, never rebuilt from a rounded average, so a leg held or
  closed whole uses cost itself and its PnL is exact. Both are gross of fees.
- current_value = held · mark (gross, positive). With nothing held, current_value and
  unrealised_pnl are 0 whatever the mark; with something held and no mark, both are None, and so
  are the basket's current_value, unrealised_pnl and net_pnl.
- fees = Σfee over all the leg's fills charged in USDT (fee_coin None, "" or "USDT"); an unknown
  fee (None) counts as 0 and a rebate is negative. Fees in other coins are totalled per coin in
  `BasketValue.fees_other`, never converted, and are not part of net_pnl.
- net_pnl = realised_pnl + unrealised_pnl - fees (USDT).

Weights, each normalised over the legs where it is defined (None everywhere when that sum is 0):
target = target_weight / Σtarget_weight; planned = planned_quantity · reference / Σ (the weights
after lot-size rounding); filled = cost / Σcost (None when nothing is filled anywhere).

Rounding: all arithmetic runs in a 50-digit context and only the outputs are quantized, half-even:
prices and money to 8 decimal places, slippage_bps to 2, weights to 6. Quantities are the exact
sums of the exchange's quantities; mark and reference prices are returned as given. Basket totals
are the sums of the unrounded leg values rounded once, so they can differ from the sum of the
rounded legs by up to half a unit per leg.

Invalid input raises ValueError: a side other than "Buy"/"Sell"; a NaN or infinite number; a
negative quantity or target weight; a reference or mark price that is not > 0; a fill with a
positive quantity and a price that is not > 0. A value that is not a Decimal raises TypeError.
"""

from __future__ import annotations

import decimal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal

_CONTEXT = decimal.Context(
    prec=50,
    rounding=ROUND_HALF_EVEN,
    traps=[
        decimal.InvalidOperation,
        decimal.DivisionByZero,
        decimal.Overflow,
        decimal.FloatOperation,
    ],
)
_ZERO = Decimal(0)
_SIGN = {"Buy": Decimal(1), "Sell": Decimal(-1)}
_USDT_COINS = frozenset({"", "USDT"})
_BPS = Decimal(10000)
PRICE_UNIT = Decimal("1E-8")
MONEY_UNIT = Decimal("1E-8")
SLIPPAGE_UNIT = Decimal("0.01")
WEIGHT_UNIT = Decimal("1E-6")


@dataclass(frozen=True, slots=True)
class Fill:
    """One filled order (a row of the trades table)."""

    quantity: Decimal  # > 0
    price: Decimal  # average fill price, > 0
    fee: Decimal | None  # None: unknown; negative: a rebate
    fee_coin: str | None  # None means USDT (linear USDT perpetuals)


@dataclass(frozen=True, slots=True)
class LegInput:
    leg: int
    symbol: str
    side: str  # the opening side: "Buy" (long leg) or "Sell" (short leg)
    target_weight: Decimal | None  # the index component's weight (not necessarily normalised)
    planned_quantity: Decimal
    reference_price: Decimal  # the price the plan sized the leg with
    opening: Sequence[Fill]  # fills of the opening orders (side = `side`)
    closing: Sequence[Fill]  # fills of the closing (reduce-only, opposite side) orders
    mark_price: Decimal | None  # current mark price, None if unknown
    # What the exchange no longer held of the leg when a close tried it (reduced outside the
    # service): neither held nor realised here (its price is not known).
    closed_elsewhere: Decimal = Decimal(0)


@dataclass(frozen=True, slots=True)
class LegValue:
    leg: int
    symbol: str
    side: str
    target_weight: Decimal | None
    planned_weight: Decimal | None
    filled_weight: Decimal | None
    planned_quantity: Decimal
    filled_quantity: Decimal
    closed_quantity: Decimal
    held_quantity: Decimal
    reference_price: Decimal
    average_entry_price: Decimal | None
    slippage_bps: Decimal | None
    average_exit_price: Decimal | None
    mark_price: Decimal | None
    entry_notional: Decimal
    current_value: Decimal | None
    unrealised_pnl: Decimal | None
    realised_pnl: Decimal
    fees: Decimal
    closed_elsewhere_quantity: Decimal = Decimal(0)


@dataclass(frozen=True, slots=True)
class BasketValue:
    legs: list[LegValue]
    entry_notional: Decimal
    current_value: Decimal | None
    unrealised_pnl: Decimal | None
    realised_pnl: Decimal
    fees: Decimal
    fees_other: dict[str, Decimal]
    net_pnl: Decimal | None


@dataclass(frozen=True, slots=True)
class _Leg:
    """One leg's unrounded figures."""

    source: LegInput
    filled: Decimal
    closed: Decimal
    held: Decimal
    cost: Decimal
    average_entry: Decimal | None
    average_exit: Decimal | None
    slippage_bps: Decimal | None
    current_value: Decimal | None
    unrealised: Decimal | None
    realised: Decimal
    fees: Decimal
    fees_other: dict[str, Decimal]


def _decimal(value: Decimal, what: str, *, minimum: Decimal | None = None) -> Decimal:
    if not isinstance(value, Decimal):
        raise TypeError(f"{what} must be a Decimal, not {type(value).__name__}")
    if not value.is_finite():
        raise ValueError(f"{what} must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{what} must be at least {minimum}, got {value}")
    return value


def _positive(value: Decimal, what: str) -> Decimal:
    _decimal(value, what)
    if value <= 0:
        raise ValueError(f"{what} must be > 0, got {value}")
    return value


def _totals(fills: Iterable[Fill], what: str) -> tuple[Decimal, Decimal]:
    """(Σq, Σq·p) of some fills, exact."""
    quantity, amount = _ZERO, _ZERO
    for fill in fills:
        q = _decimal(fill.quantity, f"{what} quantity", minimum=_ZERO)
        if q == 0:
            # A zero fill adds nothing; its price may be Bybit's "0" for an unfilled order.
            _decimal(fill.price, f"{what} price")
            continue
        p = _positive(fill.price, f"{what} price")
        quantity += q
        amount += q * p
    return quantity, amount


def _share(amount: Decimal, part: Decimal, whole: Decimal) -> Decimal:
    """amount · part / whole, and amount itself (exactly) when part is the whole."""
    if part == whole:
        return amount
    return amount * part / whole


def _value_leg(leg: LegInput) -> _Leg:
    sign = _SIGN.get(leg.side)
    if sign is None:
        raise ValueError(f"leg {leg.leg}: side must be 'Buy' or 'Sell', got {leg.side!r}")
    name = f"leg {leg.leg} ({leg.symbol})"
    _decimal(leg.planned_quantity, f"{name} planned quantity", minimum=_ZERO)
    reference = _positive(leg.reference_price, f"{name} reference price")
    if leg.target_weight is not None:
        _decimal(leg.target_weight, f"{name} target weight", minimum=_ZERO)
    mark = None if leg.mark_price is None else _positive(leg.mark_price, f"{name} mark price")

    filled, cost = _totals(leg.opening, f"{name} opening fill")
    closed, proceeds = _totals(leg.closing, f"{name} closing fill")
    elsewhere = _decimal(leg.closed_elsewhere, f"{name} closed elsewhere", minimum=_ZERO)
    held = max(filled - closed - elsewhere, _ZERO)
    average_entry = cost / filled if filled > 0 else None
    average_exit = proceeds / closed if closed > 0 else None
    slippage = (
        None if average_entry is None else sign * (average_entry - reference) / reference * _BPS
    )

    # Closing more than was opened should not happen (the exchange caps reduce-only orders at
    # the position's size). If the fills say so anyway, held stays at 0 and realised PnL is
    # taken on min(closed, filled) only, at the average exit price: what was never held is
    # neither a gain nor a loss of this position.
    matched = min(closed, filled)
    realised = sign * (_share(proceeds, matched, closed) - _share(cost, matched, filled))

    current: Decimal | None
    unrealised: Decimal | None
    if held == 0:
        current, unrealised = _ZERO, _ZERO
    elif mark is None:
        current, unrealised = None, None
    else:
        current = held * mark
        unrealised = sign * (current - _share(cost, held, filled))

    fees = _ZERO
    other: dict[str, Decimal] = {}
    for fill in (*leg.opening, *leg.closing):
        if fill.fee is None:
            continue
        fee = _decimal(fill.fee, f"{name} fee")
        if fill.fee_coin is None or fill.fee_coin in _USDT_COINS:
            fees += fee
        else:
            other[fill.fee_coin] = other.get(fill.fee_coin, _ZERO) + fee

    return _Leg(
        source=leg,
        filled=filled,
        closed=closed,
        held=held,
        cost=cost,
        average_entry=average_entry,
        average_exit=average_exit,
        slippage_bps=slippage,
        current_value=current,
        unrealised=unrealised,
        realised=realised,
        fees=fees,
        fees_other=other,
    )


def _normalised(values: Sequence[Decimal | None]) -> list[Decimal | None]:
    total = sum((value for value in values if value is not None), _ZERO)
    if total == 0:
        return [None] * len(values)
    return [None if value is None else value / total for value in values]


def _round(value: Decimal, unit: Decimal) -> Decimal:
    rounded = value.quantize(unit, rounding=ROUND_HALF_EVEN)
    # No "-0E-8" for a short leg's zero.
    return rounded.copy_abs() if rounded.is_zero() else rounded


def _round_or_none(value: Decimal | None, unit: Decimal) -> Decimal | None:
    return None if value is None else _round(value, unit)


def _sum_or_none(values: Iterable[Decimal | None]) -> Decimal | None:
    total = _ZERO
    for value in values:
        if value is None:
            return None
        total += value
    return total


def value_basket(legs: Sequence[LegInput]) -> BasketValue:
    """Value every leg and the basket as a whole (definitions in the module docstring)."""
    with decimal.localcontext(_CONTEXT):
        raw = [_value_leg(leg) for leg in legs]
        target = _normalised([leg.source.target_weight for leg in raw])
        planned = _normalised(
            [leg.source.planned_quantity * leg.source.reference_price for leg in raw]
        )
        filled = _normalised([leg.cost for leg in raw])

        values = [
            LegValue(
                leg=leg.source.leg,
                symbol=leg.source.symbol,
                side=leg.source.side,
                target_weight=_round_or_none(target[i], WEIGHT_UNIT),
                planned_weight=_round_or_none(planned[i], WEIGHT_UNIT),
                filled_weight=_round_or_none(filled[i], WEIGHT_UNIT),
                planned_quantity=leg.source.planned_quantity,
                filled_quantity=leg.filled,
                closed_quantity=leg.closed,
                held_quantity=leg.held,
                reference_price=leg.source.reference_price,
                average_entry_price=_round_or_none(leg.average_entry, PRICE_UNIT),
                slippage_bps=_round_or_none(leg.slippage_bps, SLIPPAGE_UNIT),
                average_exit_price=_round_or_none(leg.average_exit, PRICE_UNIT),
                mark_price=leg.source.mark_price,
                entry_notional=_round(leg.cost, MONEY_UNIT),
                current_value=_round_or_none(leg.current_value, MONEY_UNIT),
                unrealised_pnl=_round_or_none(leg.unrealised, MONEY_UNIT),
                realised_pnl=_round(leg.realised, MONEY_UNIT),
                fees=_round(leg.fees, MONEY_UNIT),
                closed_elsewhere_quantity=leg.source.closed_elsewhere,
            )
            for i, leg in enumerate(raw)
        ]

        unrealised = _sum_or_none(leg.unrealised for leg in raw)
        realised = sum((leg.realised for leg in raw), _ZERO)
        fees = sum((leg.fees for leg in raw), _ZERO)
        fees_other: dict[str, Decimal] = {}
        for leg in raw:
            for coin, fee in leg.fees_other.items():
                fees_other[coin] = fees_other.get(coin, _ZERO) + fee
        return BasketValue(
            legs=values,
            entry_notional=_round(sum((leg.cost for leg in raw), _ZERO), MONEY_UNIT),
            current_value=_round_or_none(
                _sum_or_none(leg.current_value for leg in raw), MONEY_UNIT
            ),
            unrealised_pnl=_round_or_none(unrealised, MONEY_UNIT),
            realised_pnl=_round(realised, MONEY_UNIT),
            fees=_round(fees, MONEY_UNIT),
            fees_other={coin: _round(fees_other[coin], MONEY_UNIT) for coin in sorted(fees_other)},
            net_pnl=None
            if unrealised is None
            else _round(realised + unrealised - fees, MONEY_UNIT),
        )
