"""A position as its JSON shows it (PositionOut): the stored rows, valued at the market
snapshot's mark prices (service/positions/valuation.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import structlog

from service.market.snapshot import MarketSnapshot
from service.models import ExecutionMode, PositionStatus, Trade
from service.positions import valuation
from service.positions.schemas import (
    ComponentOut,
    ExposureOut,
    LegOut,
    PositionOut,
    ReconciliationOut,
    TradeOut,
    ValueOut,
)
from service.positions.service import PositionDetail

logger = structlog.stdlib.get_logger("service.positions")


def _fill(trade: Trade) -> valuation.Fill:
    return valuation.Fill(trade.quantity, trade.price, trade.fee, trade.fee_coin)


def _value(detail: PositionDetail, market: MarketSnapshot | None) -> valuation.BasketValue | None:
    marks = market.marks if market is not None else {}
    legs = [
        valuation.LegInput(
            leg=leg.leg,
            symbol=leg.symbol,
            side=leg.side,
            target_weight=detail.weights.get(leg.symbol),
            planned_quantity=leg.quantity,
            reference_price=leg.reference_price,
            opening=[_fill(t) for t in detail.trades if t.leg == leg.leg and t.phase == "open"],
            closing=[_fill(t) for t in detail.trades if t.leg == leg.leg and t.phase == "close"],
            mark_price=marks.get(leg.symbol),
            closed_elsewhere=sum(
                (c.closed_elsewhere for c in detail.close_plan if c.leg == leg.leg), Decimal(0)
            ),
        )
        for leg in detail.plan
    ]
    try:
        return valuation.value_basket(legs)
    except (ValueError, TypeError, ArithmeticError) as error:
        # A row the arithmetic refuses (a price of 0, say) must not hide the position.
        logger.error(
            "position.valuation_failed", position_id=str(detail.position.id), error=str(error)
        )
        return None


def _legs(
    detail: PositionDetail, value: valuation.BasketValue | None, marked_at: datetime | None
) -> list[LegOut]:
    last_round = max((leg.round for leg in detail.close_plan), default=0)
    close_errors = {leg.leg: leg.error for leg in detail.close_plan if leg.round == last_round}
    values = {v.leg: v for v in value.legs} if value is not None else {}
    out = []
    for leg in detail.plan:
        filled = sum(
            (t.quantity for t in detail.trades if t.leg == leg.leg and t.phase == "open"),
            Decimal(0),
        )
        worth = values.get(leg.leg)
        fields: dict[str, object] = {}
        if worth is not None:
            fields = {
                "closed_quantity": worth.closed_quantity,
                "held_quantity": worth.held_quantity,
                "target_weight": worth.target_weight,
                "planned_weight": worth.planned_weight,
                "filled_weight": worth.filled_weight,
                "average_entry_price": worth.average_entry_price,
                "slippage_bps": worth.slippage_bps,
                "average_exit_price": worth.average_exit_price,
                "mark_price": worth.mark_price,
                "mark_price_at": marked_at if worth.mark_price is not None else None,
                "entry_notional": worth.entry_notional,
                "current_value": worth.current_value,
                "unrealised_pnl": worth.unrealised_pnl,
                "realised_pnl": worth.realised_pnl,
                "fees": worth.fees,
                "closed_elsewhere_quantity": worth.closed_elsewhere_quantity,
            }
        out.append(
            LegOut(
                leg=leg.leg,
                symbol=leg.symbol,
                side=leg.side,
                planned_quantity=leg.quantity,
                filled_quantity=filled,
                shortfall_quantity=max(leg.quantity - filled, Decimal(0)),
                reference_price=leg.reference_price,
                close_error=close_errors.get(leg.leg),
                **fields,
            )
        )
    return out


def _exposure(detail: PositionDetail) -> list[ExposureOut]:
    """Held per symbol and opening side: opened less closed (a close is the opposite side)."""
    held: dict[tuple[str, str], Decimal] = {}
    sides = {leg.leg: leg.side for leg in detail.plan}
    for trade in detail.trades:
        side = sides.get(trade.leg, trade.side)
        signed = trade.quantity if trade.phase == "open" else -trade.quantity
        held[(trade.symbol, side)] = held.get((trade.symbol, side), Decimal(0)) + signed
    for gone in detail.close_plan:  # what the exchange no longer held
        key = (gone.symbol, gone.opening_side)
        held[key] = held.get(key, Decimal(0)) - gone.closed_elsewhere
    return [ExposureOut(symbol=s, side=side, quantity=q) for (s, side), q in held.items() if q > 0]


def position_out(detail: PositionDetail, market: MarketSnapshot | None) -> PositionOut:
    p = detail.position
    trades = [TradeOut.model_validate(t) for t in detail.trades]
    value = _value(detail, market) if detail.trades else None
    marked_at = datetime.fromtimestamp(market.fetched_at, UTC) if market and market.marks else None
    legs = _legs(detail, value, marked_at)
    return PositionOut(
        id=p.id,
        index=p.index_code,
        size=p.size,
        direction=p.direction,
        status=p.status,
        execution=ExecutionMode(p.execution),
        error=p.error,
        failed_leg=p.failed_leg,
        attempts=p.attempts,
        next_attempt_at=p.next_attempt_at,
        waiting_for_account=p.account_wait_since is not None,
        waiting_since=p.account_wait_since,
        created_at=p.created_at,
        updated_at=p.updated_at,
        components=[
            ComponentOut(symbol=c.symbol, side=c.side, expected_quantity=c.expected_quantity)
            for c in detail.components
        ],
        legs=legs,
        # Only once the opening is done: while it executes, unfilled legs are not short yet.
        shortfall=p.status not in (PositionStatus.PENDING, PositionStatus.EXECUTING)
        and any(leg.shortfall_quantity > 0 and leg.filled_quantity > 0 for leg in legs),
        trades=trades,
        exposure=_exposure(detail),
        reconciliation=[
            ReconciliationOut(
                kind=i.kind,
                order_link_id=i.order_link_id,
                exchange=i.exchange,
                recorded=i.recorded,
                found_at=i.created_at,
            )
            for i in detail.issues
        ],
        value=(
            ValueOut.model_validate(value).model_copy(update={"marked_at": marked_at})
            if value is not None
            else None
        ),
        close_round=p.close_round,
        close_error=p.close_error,
    )


def market_version(market: MarketSnapshot | None) -> int:
    """What a position's ETag adds for the mark prices its value is shown at."""
    return int(market.fetched_at * 1000) if market is not None else 0
