"""The basket's plan: computed once from the index and the market, stored before the first
order, and read back by every later run of the position."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence

import structlog

from service.bybit.errors import BybitError
from service.execution import calls
from service.execution.deps import ExecutionDeps, Run
from service.execution.outcomes import PermanentRunError
from service.market.data import MarketDataUnavailableError
from service.models import PositionLeg, Trade
from service.models.position import open_link_id
from service.positions import repository, run_statements
from service.trading_logic import (
    CompositionError,
    Direction,
    calculate_trade_composition,
)


def order_link_id(position_id: uuid.UUID, leg: int) -> str:
    """Deterministic per position and leg (service/models/position.py: every orderLinkId's
    shape, the closing ones' too)."""
    return open_link_id(position_id, leg)


async def ensure_plan(
    deps: ExecutionDeps,
    run: Run,
    log: structlog.stdlib.BoundLogger,
    *,
    on_new_basket: Callable[[Sequence[str]], None] | None = None,
) -> tuple[Sequence[PositionLeg], bool]:
    """The stored plan, or a new one stored now; True when it is new (then no order of it was
    ever sent, and nothing is recorded). `on_new_basket(symbols)` is called as soon as a new
    basket's symbols are known, before its plan is computed and stored. A run that claimed
    its position from PENDING (`run.fresh`) has no plan to read: a plan is stored only by a
    run holding the claim, and nothing returns a position to PENDING."""
    position = run.position
    # The catalogue changes only with a deploy (`seed`): read at most every 30 s.
    index = deps.indices.peek(position.index_code) if run.fresh else None
    if index is None:
        async with deps.sessions() as session:
            stored = [] if run.fresh else await repository.get_plan(session, position.id)
            if stored:
                return stored, False
            index = await deps.indices.get(session, position.index_code)
    if index is None:
        raise PermanentRunError(f"index {position.index_code} no longer exists")
    components = list(index.components)
    symbols = [c.symbol for c in components]
    if on_new_basket is not None:
        on_new_basket(symbols)
    try:
        instruments = await calls.call(deps, deps.market.instruments, symbols)
        prices = await calls.call(
            deps, deps.market.prices, symbols, max_age=deps.market_max_age_seconds
        )
        legs = calculate_trade_composition(
            components, position.size, Direction(position.direction), instruments, prices
        )
    except (CompositionError, MarketDataUnavailableError) as error:
        raise PermanentRunError(f"cannot plan the basket: {error}") from None
    except ArithmeticError:
        # Prices or steps sizing cannot carry (decimal.Overflow, InvalidOperation...): market
        # data no exchange would quote. The basket fails before its plan is stored, so with
        # nothing sent, rather than the task ending in an unexpected exception.
        raise PermanentRunError(
            "cannot plan the basket: the market data is out of the range sizing can carry"
        ) from None
    except BybitError as error:
        raise calls.classify(error, None, "market data") from None
    # With `updated_at` moved: GET shows the plan (its legs). On the lock connection: one
    # statement.
    rows = await run_statements.add_plan(
        run.lease,
        position.id,
        [
            run_statements.PlannedLegValues(
                leg.leg,
                leg.symbol,
                leg.side.value,
                leg.quantity,
                leg.reference_price,
                order_link_id(position.id, leg.leg),
            )
            for leg in legs
        ],
    )
    log.info(
        "position.planned",
        legs=[
            {"leg": r.leg, "symbol": r.symbol, "side": r.side, "qty": str(r.quantity)} for r in rows
        ],
    )
    return rows, True


async def recorded_trades(deps: ExecutionDeps, position_id: uuid.UUID) -> list[Trade]:
    async with deps.sessions() as session:
        return list(await repository.get_trades(session, position_id))
