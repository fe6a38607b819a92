"""The two calls that change an account: set-leverage and a market order (category linear).

Checks follow Bybit's order: parameters (10001), the instrument's status (110074), the lot-size
filters (10001), the minimum order value (110094), reduce-only (110017), the orderLinkId
(110072), then the margin (110007). A market order fills at once at the last price, moved by
the configured slippage, or partly (fill_ratio) and then ends Cancelled, as Bybit's IOC does.

Reduce-only (Bybit's create-order page and error codes; docs/simulator.md has the sources): the
order only reduces the position it names, and is cut to that position's size. With no position
to reduce, or (one-way mode) on the position's own side, it is refused with 110017, in the words
Bybit answers with. Above the maximum order qty it is not refused (Bybit splits it). `qty` "0"
with `reduceOnly` and `closeOnTrigger` closes the position up to `maxMktOrderQty`. The qty
minimum and the minimum order value apply as to any order: Bybit's API docs name no exemption.
"""

from __future__ import annotations

import re
import uuid
from decimal import ROUND_DOWN, ROUND_UP, Decimal
from typing import Any

from service.simulator.errors import BybitError, now_ms, params_error
from service.simulator.instruments import Instrument
from service.simulator.state import (
    TAKER_FEE_RATE,
    Account,
    Execution,
    Order,
    Position,
    SimulatorState,
)
from service.simulator.values import decimal_string, floor_to_step, plain

ORDER_LINK_ID = re.compile(r"^[A-Za-z0-9_-]{1,36}$")
LEVERAGE_STEP = Decimal("0.01")
FEE_PLACES = Decimal("0.00000001")
QTY_SCALE = Decimal(100_000_000)  # Bybit quotes qty limits in its messages x 1e8


def require_linear(params: dict[str, Any]) -> None:
    if params.get("category") != "linear":
        raise params_error("category only support linear in the simulator")


def instrument_of(state: SimulatorState, params: dict[str, Any]) -> Instrument:
    symbol = params.get("symbol")
    instrument = state.instruments.get(symbol) if isinstance(symbol, str) else None
    if instrument is None:
        raise params_error("symbol invalid")
    return instrument


def set_leverage(state: SimulatorState, account: Account, body: dict[str, Any]) -> dict[str, Any]:
    require_linear(body)
    instrument = instrument_of(state, body)
    buy = decimal_string(body.get("buyLeverage"), "buyLeverage")
    sell = decimal_string(body.get("sellLeverage"), "sellLeverage")
    if account.margin_mode == "PORTFOLIO_MARGIN":
        raise BybitError(
            110038, "You are not allowed to change leverage due to portfolio margin mode."
        )
    if buy != sell:
        raise params_error("buyLeverage must equal sellLeverage in one-way mode")
    if not Decimal(1) <= buy <= instrument.max_leverage or buy % LEVERAGE_STEP:
        raise BybitError(
            10001, f"leverage invalid: must be in [1, {instrument.max_leverage}] step 0.01"
        )
    if account.leverage_for(instrument.symbol) == buy:
        raise BybitError(110043, "Set leverage has not been modified.")
    for position in account.positions_of(instrument.symbol):
        if position.size:
            # The margin of a position already held changes with its leverage.
            margin = abs(position.size) * position.avg_price / buy
            if margin - position.initial_margin > account.available_balance():
                raise BybitError(110044, "Available margin is insufficient.")
            position.initial_margin = margin
    account.leverage[instrument.symbol] = buy
    return {}


def _flag(raw: object, name: str) -> bool:
    if raw is None or isinstance(raw, bool):
        return bool(raw)
    if raw in ("true", "false"):
        return raw == "true"
    raise params_error(f"{name} invalid")


def _fill_price(state: SimulatorState, instrument: Instrument, side: str) -> Decimal:
    last = state.prices[instrument.symbol]
    slip = last * state.config.slippage_bps / Decimal(10_000)
    if side == "Buy":
        return (last + slip).quantize(instrument.tick_size, rounding=ROUND_UP)
    return max(
        (last - slip).quantize(instrument.tick_size, rounding=ROUND_DOWN), instrument.tick_size
    )


def place_order(state: SimulatorState, account: Account, body: dict[str, Any]) -> Order:
    """One market order, as order/create takes it and as each item of order/create-batch is
    taken: checked, then recorded and filled; BybitError when refused (nothing recorded)."""
    require_linear(body)
    instrument = instrument_of(state, body)
    side = body.get("side")
    if side not in ("Buy", "Sell"):
        raise params_error("side invalid")
    order_type = body.get("orderType")
    if order_type not in ("Market", "Limit"):
        raise params_error("orderType invalid")
    if order_type != "Market":
        raise params_error("the simulator accepts Market orders only")
    reduce_only = _flag(body.get("reduceOnly"), "reduceOnly")
    close_on_trigger = _flag(body.get("closeOnTrigger"), "closeOnTrigger")
    idx = _position_idx(account, instrument.symbol, body.get("positionIdx", 0), side, reduce_only)
    link = body.get("orderLinkId", "")
    if not isinstance(link, str) or (link and not ORDER_LINK_ID.match(link)):
        raise params_error("orderLinkId invalid")
    qty = decimal_string(body.get("qty"), "qty")
    close_all = qty == 0 and reduce_only and close_on_trigger
    if qty <= 0 and not close_all:
        raise params_error("qty invalid")
    if instrument.status != "Trading":
        raise BybitError(110074, "This contract is not live")
    position = account.positions.get((instrument.symbol, idx))
    size = position.size if position is not None else Decimal(0)
    if close_all:
        # qty "0" + reduceOnly + closeOnTrigger: the whole position, up to maxMktOrderQty.
        _check_reduce_only(size, side)
        qty = min(abs(size), instrument.max_mkt_order_qty)
    _check_lot_size(instrument, qty, reduce_only=reduce_only)
    last = state.prices[instrument.symbol]
    # Bybit's Derivatives Trading Rules exempt closing orders from the minimum order value
    # (not from the minimum quantity).
    if qty * last < instrument.min_notional_value and not reduce_only:
        raise BybitError(
            110094,
            f"Order does not meet minimum order value {plain(instrument.min_notional_value)}USDT",
        )
    if reduce_only:
        _check_reduce_only(size, side)
        qty = min(qty, abs(size))  # Bybit cuts a reduce-only order to the position
    signed = qty if side == "Buy" else -qty
    if link and link in account.order_link_ids:
        raise BybitError(110072, "OrderLinkedID is duplicate")
    price = _fill_price(state, instrument, side)
    leverage = account.leverage_for(instrument.symbol)
    opening = _opening_qty(size, signed)
    required = opening * price / leverage + qty * price * TAKER_FEE_RATE
    if required > account.available_balance():
        raise BybitError(110007, "ab not enough for new order")
    filled = floor_to_step(qty * state.config.fill_ratio, instrument.qty_step)
    if instrument.book_depth is not None:
        # A thin book: past the price-protection band the rest of the IOC is cancelled.
        filled = min(filled, floor_to_step(instrument.book_depth, instrument.qty_step))
    filled = min(max(filled, Decimal(0)), qty)
    return _execute(state, account, instrument, side, qty, filled, price, link, reduce_only, idx)


def _check_reduce_only(size: Decimal, side: str) -> None:
    """110017 unless the order is on the other side of a position it can reduce (in hedge mode
    the positionIdx rule already points a reduce-only order at the opposite side's position)."""
    if size == 0:
        raise BybitError(110017, "current position is zero, cannot fix reduce-only order qty")
    if (size > 0) == (side == "Buy"):
        raise BybitError(110017, "reduce-only order has same side with current position")


def _position_idx(account: Account, symbol: str, raw: object, side: str, reduce_only: bool) -> int:
    """Bybit's positionIdx rule: 0 in one-way mode; in hedge mode 1 for the long side and 2
    for the short side (an order that opens goes to its side, one that reduces to the
    other). The wrong one is 10001."""
    if raw not in (0, 1, 2, "0", "1", "2"):
        raise params_error("positionIdx invalid")
    idx = int(str(raw))
    if account.is_hedge(symbol):
        opening = 1 if side == "Buy" else 2
        expected = (3 - opening) if reduce_only else opening
        if idx != expected:
            raise BybitError(10001, "position idx not match position mode")
    elif idx != 0:
        raise BybitError(10001, "position idx not match position mode")
    return idx


def _levels(
    instrument: Instrument, side: str, filled: Decimal, price: Decimal
) -> list[tuple[Decimal, Decimal]]:
    """The fill as (quantity, price) executions: spread over the book's levels, each a tick
    worse for the taker than the one before."""
    levels = max(1, min(instrument.book_levels, int(filled / instrument.qty_step) or 1))
    chunk = floor_to_step(filled / levels, instrument.qty_step)
    fills = []
    for level in range(levels):
        quantity = chunk if level < levels - 1 else filled - chunk * (levels - 1)
        tick = instrument.tick_size * level
        fills.append((quantity, price + tick if side == "Buy" else max(price - tick, tick)))
    return [(q, p) for q, p in fills if q > 0]


def _check_lot_size(instrument: Instrument, qty: Decimal, *, reduce_only: bool = False) -> None:
    """qtyStep, minOrderQty and maxMktOrderQty (10001). A reduce-only order above the maximum is
    not refused: Bybit splits it into several orders (here it stays one order)."""
    if qty % instrument.qty_step:
        raise BybitError(10001, f"Qty invalid: must be a multiple of qtyStep {instrument.qty_step}")
    if qty < instrument.min_order_qty:
        raise BybitError(
            10001,
            "The number of contracts exceeds minimum limit allowed: too small, "
            f"order_qty:{plain(qty * QTY_SCALE)} < "
            f"min_qty:{plain(instrument.min_order_qty * QTY_SCALE)}",
        )
    if qty > instrument.max_mkt_order_qty and not reduce_only:
        raise BybitError(
            10001,
            "The number of contracts exceeds maximum limit allowed: too large, "
            f"order_qty:{plain(qty * QTY_SCALE)} > "
            f"max_qty:{plain(instrument.max_mkt_order_qty * QTY_SCALE)}",
        )


def _opening_qty(size: Decimal, signed: Decimal) -> Decimal:
    """How much of an order adds to the position (the rest closes it)."""
    if size == 0 or (size > 0) == (signed > 0):
        return abs(signed)
    return max(abs(signed) - abs(size), Decimal(0))


def _execute(
    state: SimulatorState,
    account: Account,
    instrument: Instrument,
    side: str,
    qty: Decimal,
    filled: Decimal,
    price: Decimal,
    link: str,
    reduce_only: bool,
    idx: int = 0,
) -> Order:
    now = now_ms()
    order_id = str(uuid.uuid4())
    fills = _levels(instrument, side, filled, price) if filled else []
    fees = [(q * p * TAKER_FEE_RATE).quantize(FEE_PLACES, rounding=ROUND_UP) for q, p in fills]
    value = sum((q * p for q, p in fills), Decimal(0))
    config = state.config
    order = Order(
        api_key=account.api_key,
        order_id=order_id,
        order_link_id=link,
        symbol=instrument.symbol,
        side=side,
        qty=qty,
        cum_exec_qty=filled,
        cum_exec_value=value,
        cum_exec_fee=sum(fees, Decimal(0)),
        avg_price=value / filled if filled else None,
        order_status="Filled" if filled == qty else "Cancelled",
        reduce_only=reduce_only,
        last_price=state.prices[instrument.symbol],
        created_ms=now,
        qty_step=instrument.qty_step,
        tick_size=instrument.tick_size,
        visible_ms=now + config.order_visible_ms,
        fill_ms=now + config.fill_delay_ms,
        # The history never lists an order before order/realtime does.
        history_ms=now + max(config.history_lag_ms, config.order_visible_ms),
        position_idx=idx,
    )
    state.orders.append(order)
    if link:
        account.order_link_ids.add(link)
    for (quantity, fill_price), fee in zip(fills, fees, strict=True):
        position = account.position(instrument.symbol, idx)
        closed = _apply_fill(
            account, position, quantity if side == "Buy" else -quantity, fill_price, now
        )
        account.wallet_balance -= fee
        position.seq = state.next_seq()
        state.executions.append(
            Execution(
                api_key=account.api_key,
                exec_id=str(uuid.uuid4()),
                order_id=order_id,
                order_link_id=link,
                symbol=instrument.symbol,
                side=side,
                exec_price=fill_price,
                exec_qty=quantity,
                exec_fee=fee,
                order_qty=qty,
                exec_ms=now + config.fill_delay_ms,
                seq=position.seq,
                closed_size=closed,
                qty_step=instrument.qty_step,
                tick_size=instrument.tick_size,
                mark_price=state.mark_price(instrument.symbol),
            )
        )
    return order


def acknowledgement(order: Order) -> dict[str, Any]:
    """order/create's result: the order was accepted (not that it filled)."""
    return {"orderId": order.order_id, "orderLinkId": order.order_link_id}


def _apply_fill(
    account: Account, position: Position, signed: Decimal, price: Decimal, now: int
) -> Decimal:
    """Move the position by a fill; returns the size it closed. Realised PnL goes to the
    wallet, the margin of the closed part is released, the opened part takes new margin."""
    leverage = account.leverage_for(position.symbol)
    closed = Decimal(0)
    if position.size and (position.size > 0) != (signed > 0):
        closed = min(abs(signed), abs(position.size))
        direction = Decimal(1) if position.size > 0 else Decimal(-1)
        pnl = closed * (price - position.avg_price) * direction
        released = position.initial_margin * closed / abs(position.size)
        account.wallet_balance += pnl
        position.cum_realised_pnl += pnl
        position.initial_margin -= released
        position.size += closed * -direction
        signed += closed * direction
        if position.size == 0:
            position.avg_price = Decimal(0)
            position.initial_margin = Decimal(0)
    if signed:
        total = abs(position.size) + abs(signed)
        position.avg_price = (abs(position.size) * position.avg_price + abs(signed) * price) / total
        position.size += signed
        position.initial_margin += abs(signed) * price / leverage
    if not position.created_ms:
        position.created_ms = now
    position.updated_ms = now
    return closed
