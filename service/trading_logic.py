"""calculate_trade_composition: an index, a size and a direction become the legs to trade.

Pure Decimal arithmetic on values passed in; no I/O.

Rounding rule (the only one): for each component, the target notional is size * weight, and
the quantity is target notional / reference price rounded DOWN to a whole multiple of the
instrument's qtyStep. So no leg ever exceeds its share of the size, and each falls short by
less than one step's value. The quantity keeps the step's exponent (step 0.001 → "0.010").
"""

from __future__ import annotations

import decimal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from enum import StrEnum
from typing import Protocol

_CONTEXT = decimal.Context(prec=50, rounding=decimal.ROUND_HALF_EVEN)
_CENT = Decimal("0.01")
# A leg is planned at least this share above minNotionalValue, so that the price moving a
# little between planning and the leg's turn (or a partial fill's remainder) does not make it
# untradeable (Bybit refuses an order below the minimum with 110094).
NOTIONAL_HEADROOM = Decimal("0.05")


class Direction(StrEnum):
    LONG = "long"
    SHORT = "short"


class Side(StrEnum):
    BUY = "Buy"
    SELL = "Sell"


def side_for(direction: Direction) -> Side:
    """Long buys every component; short sells every component."""
    return Side.BUY if direction is Direction.LONG else Side.SELL


class Weighted(Protocol):
    """A component of an index as the plan sees it: a symbol and its weight (the catalogue's
    `ComponentWeight`, or the stored `models.IndexComponent` row, as they are)."""

    @property
    def symbol(self) -> str: ...
    @property
    def weight(self) -> Decimal: ...


@dataclass(frozen=True, slots=True)
class ComponentWeight:
    symbol: str
    weight: Decimal


class InstrumentFilters(Protocol):
    @property
    def symbol(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def qty_step(self) -> Decimal: ...
    @property
    def min_order_qty(self) -> Decimal: ...
    @property
    def max_mkt_order_qty(self) -> Decimal: ...
    @property
    def min_notional_value(self) -> Decimal: ...


@dataclass(frozen=True, slots=True)
class PlannedLeg:
    leg: int
    symbol: str
    side: Side
    quantity: Decimal
    reference_price: Decimal
    target_notional: Decimal

    @property
    def notional(self) -> Decimal:
        return _CONTEXT.multiply(self.quantity, self.reference_price)


@dataclass(frozen=True, slots=True)
class SizeRange:
    min_size: Decimal
    max_size: Decimal


class CompositionError(Exception):
    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class InvalidSizeError(CompositionError):
    pass


class MarketDataError(CompositionError):
    def __init__(self, message: str, *, symbol: str) -> None:
        self.symbol = symbol
        super().__init__(message)


class LegOutOfRangeError(CompositionError):
    def __init__(
        self,
        message: str,
        *,
        leg: int,
        symbol: str,
        limit: str,
        limit_value: Decimal,
        quantity: Decimal,
        suggested_size: Decimal,
    ) -> None:
        self.leg = leg
        self.symbol = symbol
        self.limit = limit
        self.limit_value = limit_value
        self.quantity = quantity
        self.suggested_size = suggested_size
        super().__init__(message)


def _floor_to_step(value: Decimal, step: Decimal) -> Decimal:
    steps = _CONTEXT.divide(value, step).to_integral_value(rounding=ROUND_FLOOR)
    return _CONTEXT.multiply(steps, step).quantize(step)


def _ceil_to_step(value: Decimal, step: Decimal) -> Decimal:
    steps = _CONTEXT.divide(value, step).to_integral_value(rounding=ROUND_CEILING)
    return _CONTEXT.multiply(steps, step).quantize(step)


def _min_notional(instrument: InstrumentFilters) -> Decimal:
    return _CONTEXT.multiply(instrument.min_notional_value, 1 + NOTIONAL_HEADROOM)


def _check_size(size: object) -> Decimal:
    if not isinstance(size, Decimal):
        raise InvalidSizeError(f"size must be a Decimal, got {type(size).__name__}")
    if not size.is_finite() or size <= 0:
        raise InvalidSizeError(f"size must be a positive finite amount, got {size}")
    return size


def _market(
    components: Sequence[Weighted],
    instruments: Mapping[str, InstrumentFilters],
    prices: Mapping[str, Decimal],
) -> list[tuple[Weighted, InstrumentFilters, Decimal]]:
    if not components:
        raise CompositionError("the index has no components")
    rows = []
    for component in components:
        if isinstance(component.weight, float) or not isinstance(component.weight, Decimal):
            raise TypeError(f"weight of {component.symbol} must be a Decimal")
        instrument = instruments.get(component.symbol)
        if instrument is None:
            raise MarketDataError(
                f"no instrument filters for {component.symbol}", symbol=component.symbol
            )
        if instrument.status != "Trading":
            raise MarketDataError(
                f"{component.symbol} is not trading (status {instrument.status})",
                symbol=component.symbol,
            )
        if instrument.qty_step <= 0:
            raise MarketDataError(
                f"{component.symbol} has a non-positive qtyStep", symbol=component.symbol
            )
        price = prices.get(component.symbol)
        if price is None:
            raise MarketDataError(f"no price for {component.symbol}", symbol=component.symbol)
        if not isinstance(price, Decimal) or not price.is_finite() or price <= 0:
            raise MarketDataError(
                f"price of {component.symbol} is not a positive decimal: {price!r}",
                symbol=component.symbol,
            )
        rows.append((component, instrument, price))
    return rows


def _min_size_for(component: Weighted, instrument: InstrumentFilters, price: Decimal) -> Decimal:
    """The smallest size at which this leg meets minOrderQty and minNotionalValue (with its
    headroom)."""
    by_notional = _ceil_to_step(
        _CONTEXT.divide(_min_notional(instrument), price), instrument.qty_step
    )
    needed = max(instrument.min_order_qty, by_notional, instrument.qty_step)
    needed = _ceil_to_step(needed, instrument.qty_step)
    return _CONTEXT.divide(_CONTEXT.multiply(needed, price), component.weight)


def _max_size_for(component: Weighted, instrument: InstrumentFilters, price: Decimal) -> Decimal:
    """The largest size at which this leg stays within maxMktOrderQty (exclusive bound + step)."""
    # floor(S*w/p/step)*step <= max  <=>  S*w/p < max + step (max is a step multiple on Bybit).
    limit = _floor_to_step(instrument.max_mkt_order_qty, instrument.qty_step) + instrument.qty_step
    return _CONTEXT.divide(_CONTEXT.multiply(limit, price), component.weight)


def tradeable_size_range(
    components: Sequence[Weighted],
    instruments: Mapping[str, InstrumentFilters],
    prices: Mapping[str, Decimal],
) -> SizeRange:
    """The sizes (USDT, to the cent) at which every leg passes every filter."""
    rows = _market(components, instruments, prices)
    low = max(_min_size_for(c, i, p) for c, i, p in rows)
    # The upper bound is exclusive: step back one cent below it.
    high_exclusive = min(_max_size_for(c, i, p) for c, i, p in rows)
    min_size = low.quantize(_CENT, rounding=ROUND_CEILING)
    max_size = high_exclusive.quantize(_CENT, rounding=ROUND_CEILING) - _CENT
    return SizeRange(min_size=min_size, max_size=max_size)


def calculate_trade_composition(
    components: Sequence[Weighted],
    size: Decimal,
    direction: Direction,
    instruments: Mapping[str, InstrumentFilters],
    prices: Mapping[str, Decimal],
) -> tuple[PlannedLeg, ...]:
    """The legs, in component order, or an error naming the first leg that cannot trade."""
    size = _check_size(size)
    rows = _market(components, instruments, prices)
    side = side_for(Direction(direction))
    legs = []
    for number, (component, instrument, price) in enumerate(rows):
        target = _CONTEXT.multiply(size, component.weight)
        quantity = _floor_to_step(_CONTEXT.divide(target, price), instrument.qty_step)
        legs.append(
            PlannedLeg(
                leg=number,
                symbol=component.symbol,
                side=side,
                quantity=quantity,
                reference_price=price,
                target_notional=target,
            )
        )
    for leg, (_, instrument, _) in zip(legs, rows, strict=True):
        _check_leg(leg, size, instrument, components, instruments, prices)
    return tuple(legs)


@dataclass(frozen=True, slots=True)
class FilterViolation:
    """The first of the exchange's order filters an order breaks."""

    limit: str  # status, minOrderQty, minNotionalValue or maxMktOrderQty
    limit_value: Decimal | None
    what: str  # the order's value that breaks it: "quantity 0.0005", "notional 4.2 USDT"
    message: str  # the whole sentence, for a user


def order_filter_violation(
    symbol: str,
    quantity: Decimal,
    instrument: InstrumentFilters,
    price: Decimal,
    *,
    keep_headroom: bool,
    reduce_only: bool = False,
) -> FilterViolation | None:
    """The exchange's rules for a market order of `quantity` at `price`, in one place: the
    instrument trades, minOrderQty <= quantity <= maxMktOrderQty, and the notional is at
    least minNotionalValue (with `keep_headroom`, NOTIONAL_HEADROOM above it: what planning
    and remainder orders keep, so a small price move does not make the order untradeable)."""
    if instrument.status != "Trading":
        return FilterViolation(
            "status", None, "status", f"{symbol} is not trading (status {instrument.status})"
        )
    if quantity < instrument.min_order_qty or quantity <= 0:
        what = f"quantity {quantity}"
        return FilterViolation(
            "minOrderQty",
            instrument.min_order_qty,
            what,
            f"{what} is below minOrderQty {instrument.min_order_qty}",
        )
    notional = _CONTEXT.multiply(quantity, price)
    minimum = _min_notional(instrument) if keep_headroom else instrument.min_notional_value
    # Bybit's trading rules exempt closing (reduce-only) orders from the minimum order value,
    # not from the minimum quantity.
    if notional < minimum and not reduce_only:
        what = f"notional {notional.normalize():f} USDT"
        kept = (
            f" plus the {NOTIONAL_HEADROOM:.0%} kept for price moves ({minimum.normalize():f})"
            if keep_headroom
            else ""
        )
        return FilterViolation(
            "minNotionalValue",
            instrument.min_notional_value,
            what,
            f"{what} at price {price} is below minNotionalValue "
            f"{instrument.min_notional_value}{kept}",
        )
    if quantity > instrument.max_mkt_order_qty:
        what = f"quantity {quantity}"
        return FilterViolation(
            "maxMktOrderQty",
            instrument.max_mkt_order_qty,
            what,
            f"{what} is above maxMktOrderQty {instrument.max_mkt_order_qty}",
        )
    return None


def _check_leg(
    leg: PlannedLeg,
    size: Decimal,
    instrument: InstrumentFilters,
    components: Sequence[Weighted],
    instruments: Mapping[str, InstrumentFilters],
    prices: Mapping[str, Decimal],
) -> None:
    violation = order_filter_violation(
        leg.symbol, leg.quantity, instrument, leg.reference_price, keep_headroom=True
    )
    if violation is None:
        return
    name = f"leg {leg.leg} ({leg.symbol})"
    assert violation.limit_value is not None  # the status was checked with the market
    if violation.limit == "maxMktOrderQty":
        suggested = tradeable_size_range(components, instruments, prices).max_size
        message = (
            f"size {size} is too large for {name}: {violation.what} is above "
            f"maxMktOrderQty {violation.limit_value}; the largest size that can be "
            f"traded is {suggested}"
        )
    else:
        kept = ""
        if violation.limit == "minNotionalValue":
            kept = (
                f" plus the {NOTIONAL_HEADROOM:.0%} kept for price moves "
                f"({_min_notional(instrument).normalize():f})"
            )
        suggested = tradeable_size_range(components, instruments, prices).min_size
        message = (
            f"size {size} is too small for {name}: {violation.what} is below "
            f"{violation.limit} {violation.limit_value}{kept}; the smallest size that can be "
            f"traded is {suggested}"
        )
    raise LegOutOfRangeError(
        message,
        leg=leg.leg,
        symbol=leg.symbol,
        limit=violation.limit,
        limit_value=violation.limit_value,
        quantity=leg.quantity,
        suggested_size=suggested,
    )
