"""Reconciliation (a Beat job): our recorded fills against the exchange's own records.

For every recent ACTIVE or FAILED position, each leg that was sent is looked up on the
exchange by its orderLinkId and compared with `trades`:
- the exchange filled it and we have no trade: `missing_fill` (the fill is recorded now, never
  dropped);
- quantities or prices differ: `quantity_mismatch` / `price_mismatch`;
- we have a trade the exchange does not know: `unknown_order`.
Each difference is logged as `reconciliation.mismatch` with both sides and stored once per leg
and kind (shown on the position), so running again records nothing twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from service.bybit.errors import BybitError
from service.bybit.types import Order
from service.credentials.service import load_decrypted
from service.execution import ExecutionDeps
from service.metrics import RECONCILIATION_MISMATCHES
from service.models import PositionLeg, SyntheticPosition, Trade
from service.positions import repository
from service.security import CredentialDecryptionError

logger = structlog.stdlib.get_logger("service.reconciliation")


@dataclass
class ReconciliationReport:
    positions: int = 0
    legs: int = 0
    mismatches: list[tuple[str, str]] = field(default_factory=list)  # (order_link_id, kind)
    errors: int = 0


def _order_view(order: Order | None) -> dict[str, Any] | None:
    if order is None:
        return None
    return {
        "order_id": order.order_id,
        "status": order.order_status,
        "quantity": format(order.cum_exec_qty, "f"),
        "price": format(order.avg_price, "f") if order.avg_price is not None else None,
    }


def _trade_view(trade: Trade | None) -> dict[str, Any] | None:
    if trade is None:
        return None
    return {
        "order_id": trade.bybit_order_id,
        "quantity": format(trade.quantity, "f"),
        "price": format(trade.price, "f"),
    }


async def reconcile_recent(
    deps: ExecutionDeps, *, window_seconds: float = 24 * 3600, limit: int = 200
) -> ReconciliationReport:
    report = ReconciliationReport()
    async with deps.sessions() as session:
        positions = await repository.recent_final_positions(
            session, window_seconds=window_seconds, limit=limit
        )
    for position in positions:
        try:
            await _reconcile_position(deps, position, report)
        except (BybitError, CredentialDecryptionError) as error:
            report.errors += 1
            logger.warning("reconciliation.skipped", position_id=str(position.id), error=str(error))
    return report


async def _reconcile_position(
    deps: ExecutionDeps, position: SyntheticPosition, report: ReconciliationReport
) -> None:
    async with deps.sessions() as session:
        legs = [leg for leg in await repository.get_plan(session, position.id) if leg.submitted_at]
        trades = {t.order_link_id: t for t in await repository.get_trades(session, position.id)}
        credentials = await load_decrypted(session, deps.cipher, position.user_id)
    report.positions += 1
    if not legs or credentials is None:
        return
    for leg in legs:
        report.legs += 1
        order = await deps.exchange.get_order(
            credentials, symbol=leg.symbol, order_link_id=leg.order_link_id
        )
        trade = trades.get(leg.order_link_id)
        for kind in _differences(order, trade):
            await _record(deps, position, leg, kind, order, trade, report)


def _differences(order: Order | None, trade: Trade | None) -> list[str]:
    filled = order is not None and order.cum_exec_qty > 0
    if trade is None:
        return ["missing_fill"] if filled else []
    if order is None:
        return ["unknown_order"]
    kinds = []
    if order.cum_exec_qty != trade.quantity:
        kinds.append("quantity_mismatch")
    if order.avg_price is not None and order.avg_price != trade.price:
        kinds.append("price_mismatch")
    return kinds


async def _record(
    deps: ExecutionDeps,
    position: SyntheticPosition,
    leg: PositionLeg,
    kind: str,
    order: Order | None,
    trade: Trade | None,
    report: ReconciliationReport,
) -> None:
    async with deps.sessions() as session:
        if kind == "missing_fill" and order is not None and order.avg_price is not None:
            # The exchange filled it and we never recorded it: record it now.
            await repository.record_trade(
                session,
                {
                    "position_id": position.id,
                    "leg": leg.leg,
                    "symbol": leg.symbol,
                    "side": leg.side,
                    "bybit_order_id": order.order_id,
                    "order_link_id": leg.order_link_id,
                    "price": order.avg_price,
                    "quantity": order.cum_exec_qty,
                    "fee": order.cum_exec_fee,
                    "order_status": order.order_status,
                    "executed_at": order.updated_at or datetime.now(UTC),
                },
            )
        new = await repository.add_reconciliation_issue(
            session,
            {
                "position_id": position.id,
                "order_link_id": leg.order_link_id,
                "kind": kind,
                "exchange": _order_view(order),
                "recorded": _trade_view(trade),
            },
        )
    if new:
        RECONCILIATION_MISMATCHES.labels(kind).inc()
        report.mismatches.append((leg.order_link_id, kind))
        logger.error(
            "reconciliation.mismatch",
            position_id=str(position.id),
            leg=leg.leg,
            symbol=leg.symbol,
            order_link_id=leg.order_link_id,
            kind=kind,
            exchange=_order_view(order),
            recorded=_trade_view(trade),
        )
