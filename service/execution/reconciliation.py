"""Reconciliation (a Beat job): our recorded fills against the exchange's own records.

Every position that may have orders on the exchange (all but PENDING) and changed since it was
last reconciled is covered once that change has settled (RECONCILE_SETTLE_SECONDS: the
exchange's history may lag a moment), EXECUTING and CLOSING ones first (a dead run's missing
fill is the most urgent), then the others, oldest change first, in pages, until none is left or the
run's deadline comes (the next run goes on where this one stopped: `reconciled_at` on each
position is the durable bookmark). A position whose run is alive right now is left to that run
and looked at after it. For each order that was sent (the opening's legs and every close
round's), the exchange's order (by orderLinkId) is compared with `trades`:
- the exchange filled it and we have no trade: `missing_fill` (the fill is recorded now, never
  dropped; on an EXECUTING position this is what a run that died after the fill left behind);
- quantities or prices differ: `quantity_mismatch` / `price_mismatch`;
- we have a trade the exchange does not know: `unknown_order`.
Each difference is logged as `reconciliation.mismatch` with both sides and stored once per leg
and kind (shown on the position), so running again records nothing twice. A position is
marked reconciled without touching its `updated_at` (or ETag) unless something it shows
changed.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from service.bybit.auth import ApiCredentials
from service.bybit.errors import BybitError
from service.bybit.types import Order
from service.credentials.service import load_decrypted
from service.execution.deps import ExecutionDeps
from service.execution.legs import trade_values
from service.metrics import RECONCILIATION_MISMATCHES
from service.models import PlannedLeg, PositionStatus, SyntheticPosition, Trade
from service.positions import locks, reconciliation_rows, repository
from service.security import CredentialDecryptionError

logger = structlog.stdlib.get_logger("service.execution.reconciliation")


@dataclass
class ReconciliationReport:
    positions: int = 0
    legs: int = 0
    mismatches: list[tuple[str, str]] = field(default_factory=list)  # (order_link_id, kind)
    errors: int = 0
    # EXECUTING with a run alive, a retry ahead or a recent sign of life: left to the run.
    live: int = 0
    unsettled: int = 0  # an order not final yet, or its price not known yet: looked at later
    finished: bool = True  # False: the deadline came first; the next run goes on


class _NotSettled(Exception):
    """The exchange's record of a leg is not final yet: compare it on a later run."""


@dataclass(frozen=True, slots=True)
class _Difference:
    leg: PlannedLeg
    link: str  # the order's orderLinkId: the leg's first, or one for its remainder
    kind: str
    order: Order | None
    trade: Trade | None


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


async def reconcile_positions(
    deps: ExecutionDeps,
    *,
    window_seconds: float = 6 * 86400,
    settle_seconds: float = 0.0,
    page_size: int = 100,
    deadline: float | None = None,
) -> ReconciliationReport:
    """Reconcile every due position (see the module's docstring). `deadline` is the event-loop
    time by which to stop; what is left is due on the next run."""
    report = ReconciliationReport()
    loop = asyncio.get_running_loop()
    # Positions a dead run left EXECUTING first: a fill missing from their books is the most
    # urgent difference there is. Then the final ones.
    for statuses in (
        [PositionStatus.EXECUTING, PositionStatus.CLOSING],
        [
            PositionStatus.ACTIVE,
            PositionStatus.FAILED,
            PositionStatus.CLOSED,
            PositionStatus.CLOSE_FAILED,
        ],
    ):
        after: tuple[datetime, uuid.UUID] | None = None
        while True:
            async with deps.sessions() as session:
                page = await reconciliation_rows.unreconciled_positions(
                    session,
                    window_seconds=window_seconds,
                    settle_seconds=settle_seconds,
                    limit=page_size,
                    statuses=statuses,
                    after=after,
                )
            if not page:
                break
            for position in page:
                if deadline is not None and loop.time() >= deadline:
                    report.finished = False
                    return report
                await _reconcile_one(deps, position, report, settle_seconds)
            after = (page[-1].updated_at, page[-1].id)
    return report


async def _reconcile_one(
    deps: ExecutionDeps,
    position: SyntheticPosition,
    report: ReconciliationReport,
    settle_seconds: float,
) -> None:
    if PositionStatus(position.status).is_run and await _left_to_its_run(
        deps, position, settle_seconds
    ):
        report.live += 1
        return
    try:
        differences = await _compare(deps, position, report)
    except _NotSettled:
        report.unsettled += 1
        return
    except (BybitError, CredentialDecryptionError, _NoCredentialsError) as error:
        report.errors += 1
        logger.warning("reconciliation.skipped", position_id=str(position.id), error=str(error))
        return
    async with deps.sessions() as session:
        recorded = []
        changed = False
        for difference in differences:
            new_issue, new_trade = await _record(session, position, difference)
            changed = changed or new_issue or new_trade
            if new_issue:
                recorded.append(difference)
        await reconciliation_rows.mark_reconciled(
            session, position.id, seen=position.updated_at, changed=changed
        )
    for difference in recorded:
        RECONCILIATION_MISMATCHES.labels(difference.kind).inc()
        report.mismatches.append((difference.link, difference.kind))
        logger.error(
            "reconciliation.mismatch",
            position_id=str(position.id),
            position_status=position.status,
            leg=difference.leg.leg,
            symbol=difference.leg.symbol,
            order_link_id=difference.link,
            kind=difference.kind,
            exchange=_order_view(difference.order),
            recorded=_trade_view(difference.trade),
        )


async def _left_to_its_run(
    deps: ExecutionDeps, position: SyntheticPosition, settle_seconds: float
) -> bool:
    """An EXECUTING or CLOSING position is its run's to record while that run is alive, has a
    retry ahead, or showed a sign of life lately; only what a dead run left behind is ours."""
    now = datetime.now(UTC)
    if position.next_attempt_at is not None and position.next_attempt_at > now:
        return True
    if position.heartbeat_at is not None and (
        (now - position.heartbeat_at).total_seconds() < settle_seconds
    ):
        return True
    async with deps.sessions() as session:
        return await locks.is_run_alive(session, position.id)


class _NoCredentialsError(Exception):
    """The user's key is gone: the position cannot be compared (it is tried again later)."""


async def _compare(
    deps: ExecutionDeps, position: SyntheticPosition, report: ReconciliationReport
) -> list[_Difference]:
    async with deps.sessions() as session:
        sent: list[PlannedLeg] = [*await repository.get_plan(session, position.id)]
        sent += await repository.get_close_plans_of(session, [position.id])
        legs = [leg for leg in sent if leg.submitted_at]
        trades = {t.order_link_id: t for t in await repository.get_trades(session, position.id)}
        credentials = await load_decrypted(session, deps.cipher, position.user_id) if legs else None
    report.positions += 1
    if not legs:
        return []
    if credentials is None:
        raise _NoCredentialsError("the user's Bybit key is no longer stored")
    differences: list[_Difference] = []
    for leg in legs:
        report.legs += 1
        # Every order of the leg: the first (unless refused outright), and those sent for a
        # partial fill's remainder.
        links = [] if leg.refused_at is not None else [leg.order_link_id]
        links += [leg.remainder_link(number) for number in range(1, leg.remainders_submitted + 1)]
        for link in links:
            order = await deps.exchange.get_order(
                credentials, symbol=leg.symbol, order_link_id=link
            )
            if order is not None and not order.is_final:
                raise _NotSettled(link)
            if order is not None and order.cum_exec_qty > 0 and order.avg_price is None:
                order = replace(order, avg_price=await _average_price(deps, credentials, order))
            trade = trades.get(link)
            differences.extend(
                _Difference(leg, link, kind, order, trade) for kind in _kinds(order, trade)
            )
    return differences


def _kinds(order: Order | None, trade: Trade | None) -> list[str]:
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


async def _average_price(deps: ExecutionDeps, credentials: ApiCredentials, order: Order) -> Decimal:
    executions = await deps.exchange.get_executions(
        credentials, symbol=order.symbol, order_id=order.order_id
    )
    quantity = sum((e.exec_qty for e in executions), Decimal(0))
    if quantity <= 0:
        raise _NotSettled(order.order_link_id)
    return sum((e.exec_price * e.exec_qty for e in executions), Decimal(0)) / quantity


async def _record(
    session: AsyncSession, position: SyntheticPosition, difference: _Difference
) -> tuple[bool, bool]:
    """Store one difference, and a missing fill itself; returns (new issue, new trade)."""
    order = difference.order
    new_trade = False
    if difference.kind == "missing_fill" and order is not None and order.avg_price is not None:
        # The exchange filled it and we never recorded it: record it now.
        new_trade = await repository.record_trade(
            session,
            trade_values(position.id, difference.leg, order, order.avg_price),
        )
    new_issue = await reconciliation_rows.add_reconciliation_issue(
        session,
        {
            "position_id": position.id,
            "order_link_id": difference.link,
            "kind": difference.kind,
            "exchange": _order_view(order),
            "recorded": _trade_view(difference.trade),
        },
    )
    return new_issue, new_trade
