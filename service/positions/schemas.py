from __future__ import annotations

import re
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

from service.models import ExecutionMode
from service.trading_logic import Direction

MAX_SIZE = Decimal("1000000000")
EXECUTION_DESCRIPTION = (
    "how the legs are sent. `sequential` (the default): one market order after another, "
    "each fill read before the next order; the first leg that fails for good stops the "
    "basket, so a refusal leaves the fewest legs held, but the basket is held in part for "
    "two exchange round trips per leg while prices move. `batch`: every leg's order in "
    "create-batch requests (BATCH_MAX_ORDERS per request), then every fill read at once: "
    "the shortest time holding part of the basket, but a leg the exchange refuses inside "
    "the batch leaves the batch's other legs filled (shown in `legs`; nothing is "
    "reversed). Pre-flight checks run before either, so most refusals happen before any "
    "order"
)
# ASCII digits only: Decimal() also reads other scripts' digits (Arabic-Indic ones make a
# valid 1000), which no client means to send to a trading API.
_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


def _parse_size(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
        raise ValueError('size must be a decimal string such as "1000" or a number')
    text = str(value).strip()
    if text.lower().lstrip("+-") in ("nan", "snan", "inf", "infinity"):
        raise ValueError("size must be a finite number")
    if not _DECIMAL.fullmatch(text):
        raise ValueError(f"size must be a decimal number, got {text[:40]!r}")
    size = Decimal(text)
    if size <= 0:
        raise ValueError("size must be greater than 0")
    if size > MAX_SIZE:
        raise ValueError(f"size must be at most {MAX_SIZE} USDT")
    exponent = size.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -8:
        raise ValueError("size must have at most 8 decimal places")
    return size


# Money leaves the API as a string, never as a float.
DecimalString = Annotated[Decimal, PlainSerializer(lambda d: format(d, "f"), return_type=str)]
Size = Annotated[
    Decimal,
    BeforeValidator(_parse_size),
    PlainSerializer(lambda d: format(d, "f"), return_type=str),
]


class PositionCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"index": "BLUECHIP", "size": "1000", "direction": "long"}]
        },
    )

    index: str = Field(min_length=1, max_length=32, description="index code, see GET /api/indices")
    size: Size = Field(description="USDT notional, a decimal string (or number)")
    direction: Direction
    execution: ExecutionMode = Field(
        default=ExecutionMode.SEQUENTIAL,
        description=EXECUTION_DESCRIPTION,
    )


class ComponentOut(BaseModel):
    symbol: str
    side: str
    expected_quantity: DecimalString


class TradeOut(BaseModel):
    # Read from a `trades` row: the fields are its columns.
    model_config = ConfigDict(from_attributes=True)

    leg: int
    symbol: str
    side: str
    bybit_order_id: str
    order_link_id: str
    price: DecimalString
    quantity: DecimalString
    fee: DecimalString | None
    fee_coin: str | None = Field(default=None, description="the coin the fee was charged in")
    order_status: str
    phase: str = Field(
        default="open",
        description="open: an order of the opening (side = the leg's side); close: a "
        "reduce-only order of a close (the opposite side)",
    )
    executed_at: datetime


OptionalDecimal = DecimalString | None


class LegOut(BaseModel):
    """One leg of the basket: what was planned, what filled (over all its orders: a market
    order that fills only in part is followed by orders for the remainder), the shortfall
    that could not be traded, what was closed and what is still held, and what it is worth.
    Prices and money in USDT, as decimal strings; null where not known (nothing filled yet,
    no mark price)."""

    leg: int
    symbol: str
    side: str = Field(description="the opening side: Buy (long) or Sell (short)")
    planned_quantity: DecimalString
    filled_quantity: DecimalString = Field(description="filled by the opening's orders")
    shortfall_quantity: DecimalString
    reference_price: DecimalString = Field(description="the price the leg was sized with")
    closed_quantity: DecimalString = Field(
        default=Decimal(0), description="bought back or sold by closes"
    )
    held_quantity: DecimalString = Field(
        default=Decimal(0), description="what this position still holds: filled - closed"
    )
    target_weight: OptionalDecimal = Field(
        default=None, description="the index's weight of the component, normalised"
    )
    planned_weight: OptionalDecimal = Field(
        default=None,
        description="the leg's share of the planned notional after lot-size rounding "
        "(planned quantity x reference price)",
    )
    filled_weight: OptionalDecimal = Field(
        default=None, description="the leg's share of the entry notional that filled"
    )
    average_entry_price: OptionalDecimal = None
    slippage_bps: OptionalDecimal = Field(
        default=None,
        description="average entry against the reference price in basis points, signed so "
        "that positive is worse for the user",
    )
    average_exit_price: OptionalDecimal = Field(
        default=None, description="average price of the closing fills"
    )
    mark_price: OptionalDecimal = Field(
        default=None, description="Bybit's mark price from the market snapshot"
    )
    mark_price_at: datetime | None = Field(
        default=None,
        description="when the mark price was read (its age is now minus this; the snapshot "
        "is refreshed every MARKET_REFRESH_SECONDS)",
    )
    entry_notional: DecimalString = Field(
        default=Decimal(0), description="sum of quantity x price of the opening fills"
    )
    current_value: OptionalDecimal = Field(default=None, description="held quantity x mark price")
    unrealised_pnl: OptionalDecimal = Field(
        default=None, description="of the held quantity at the mark price, before fees"
    )
    realised_pnl: DecimalString = Field(
        default=Decimal(0), description="of the closed quantity, before fees"
    )
    fees: DecimalString = Field(
        default=Decimal(0), description="USDT fees of the leg's opening and closing fills"
    )
    close_error: str | None = Field(
        default=None, description="why the last close could not close this leg"
    )
    closed_elsewhere_quantity: DecimalString = Field(
        default=Decimal(0),
        description="what the exchange no longer held of this leg when a close tried it "
        "(reduced outside the service: by hand, a liquidation): not held, no PnL counted",
    )


class ValueOut(BaseModel):
    """What the basket is worth, in USDT (decimal strings): unrealised PnL at the mark price,
    realised PnL of what closes bought back or sold, both before fees; net = realised +
    unrealised - fees. Null where a mark price is missing."""

    # Read from valuation.BasketValue (with `marked_at` beside it).
    model_config = ConfigDict(from_attributes=True)

    entry_notional: DecimalString
    current_value: OptionalDecimal
    unrealised_pnl: OptionalDecimal
    realised_pnl: DecimalString
    fees: DecimalString
    fees_other: dict[str, DecimalString] = Field(
        default_factory=dict, description="fees Bybit charged in other coins, by coin"
    )
    net_pnl: OptionalDecimal
    marked_at: datetime | None = Field(default=None, description="when the mark prices were read")


class ExposureOut(BaseModel):
    """What the user holds from this position, per symbol, from the recorded fills (opened
    less closed)."""

    symbol: str
    side: str
    quantity: DecimalString


class ReconciliationOut(BaseModel):
    """A difference between the recorded fill and the exchange's record of one leg."""

    kind: str = Field(
        description="missing_fill (recorded since), quantity_mismatch, price_mismatch, "
        "unknown_order"
    )
    order_link_id: str
    exchange: dict[str, Any] | None
    recorded: dict[str, Any] | None
    found_at: datetime


class PositionOut(BaseModel):
    id: uuid.UUID
    index: str
    size: DecimalString
    direction: str
    status: str
    execution: ExecutionMode = Field(
        default=ExecutionMode.SEQUENTIAL, description="how the legs are sent (see POST)"
    )
    error: str | None
    failed_leg: int | None
    attempts: int
    next_attempt_at: datetime | None
    waiting_for_account: bool = Field(
        default=False,
        description="true while the position waits for another basket of the same exchange "
        "account to finish (baskets of one account run one at a time); not a failure",
    )
    waiting_since: datetime | None = Field(
        default=None, description="when the wait for the account began"
    )
    created_at: datetime
    updated_at: datetime
    components: list[ComponentOut]
    legs: list[LegOut] = Field(
        default_factory=list,
        description="the plan per leg with planned, filled and shortfall quantities "
        "(empty until the position is planned)",
    )
    shortfall: bool = Field(
        default=False,
        description="true when a leg filled less than planned and the rest could not be "
        "traded (a thin book); `legs` says how much",
    )
    trades: list[TradeOut]
    reconciliation: list[ReconciliationOut] = Field(
        default_factory=list, description="differences found by reconciliation, if any"
    )
    exposure: list[ExposureOut] = Field(
        description="open exposure per symbol from the fills: for a FAILED basket, exactly "
        "what the user holds (nothing is reversed); after a close, what it did not close"
    )
    value: ValueOut | None = Field(
        default=None, description="what the basket is worth (null until something filled)"
    )
    close_round: int = Field(
        default=0, description="how many times a close was asked for (0: never)"
    )
    close_error: str | None = Field(
        default=None,
        description="why the last close ended CLOSE_FAILED: each leg still held, how much, "
        "and why (POST /close again to retry them)",
    )


class PositionPage(BaseModel):
    items: list[PositionOut]
    next_cursor: str | None = Field(
        default=None, description="pass as `cursor` for the next page; null on the last page"
    )
