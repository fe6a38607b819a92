"""A run's own statements on its lock connection (service/positions/run_statements.py): the
claim from PENDING and ACTIVE with its snapshot are fenced by the lock that very connection
holds, the plan and the fills are written once, ACTIVE writes its snapshot only with the
status (and counts the fills recorded with it), and the pre-flight's facts go with the
proof of ownership."""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import fields
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db import SessionScope
from service.execution.deps import PreflightFacts
from service.execution.run_lock import advisory_run_lock
from service.models import PositionComponent, PositionStatus, Trade
from service.positions import repository, run_statements
from tests.integration.conftest import pending_position
from tests.support import eventually, worker_opener

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


def _leg(leg: int, symbol: str) -> run_statements.PlannedLegValues:
    return run_statements.PlannedLegValues(
        leg, symbol, "Buy", Decimal("0.5"), Decimal("100"), f"rs-{secrets.token_hex(6)}-{leg}"
    )


def _fill(
    planned: run_statements.PlannedLegValues, quantity: str, link: str | None = None
) -> run_statements.FillValues:
    return run_statements.FillValues(
        leg=planned.leg,
        symbol=planned.symbol,
        side=planned.side,
        bybit_order_id=secrets.token_hex(8),
        order_link_id=link or planned.order_link_id,
        price=Decimal("100.5"),
        quantity=Decimal(quantity),
        fee=Decimal("0.01"),
        fee_coin="USDT",
        fee_detail={"USDT": "0.01"},
        order_status="Filled",
        phase="open",
        executed_at=datetime.now(UTC),
    )


async def test_a_new_basket_is_claimed_planned_filled_and_finished_once(
    engine: AsyncEngine, sessions: SessionScope
) -> None:
    position_id = await pending_position(sessions, worker_opener())
    async with advisory_run_lock(engine)(position_id) as lease:
        assert lease is not None
        claimed = await run_statements.claim_new(lease, position_id, "task-1")
        assert claimed is not None
        assert claimed.id == position_id
        assert claimed.status == PositionStatus.EXECUTING
        assert claimed.claim == "task-1"
        assert claimed.attempts == 1
        # Claimed once: a second claim finds it no longer PENDING.
        assert await run_statements.claim_new(lease, position_id, "task-2") is None

        planned = [_leg(1, "BTCUSDT"), _leg(2, "ETHUSDT")]
        legs = await run_statements.add_plan(lease, position_id, planned)
        assert [(leg.leg, leg.symbol, leg.position_id) for leg in legs] == [
            (1, "BTCUSDT", position_id),
            (2, "ETHUSDT", position_id),
        ]
        # The pre-flight's facts go with the proof that marks the first order submitted.
        facts = PreflightFacts("uid-1", {2: 1})
        assert await lease.confirm("task-1", submitting_legs=[1], facts=facts)
        # Not this claim's proof: nothing written.
        assert not await lease.confirm("task-2", facts=PreflightFacts("uid-x", {1: 2}))
        assert await lease.confirm("task-1", facts=PreflightFacts("uid-2", {}))

        first = _fill(planned[0], "0.5")
        await run_statements.record_fills(lease, position_id, [first])
        await run_statements.record_fills(lease, position_id, [first])  # reported twice

        # Not this claim's to finish: the status and the snapshot not written.
        assert await run_statements.finish_active(lease, position_id, "task-2") is None
        # The last fill recorded with ACTIVE, and counted in its snapshot; the first one,
        # reported again, once.
        filled = await run_statements.finish_active(
            lease, position_id, "task-1", [first, _fill(planned[1], "0.25")]
        )
        assert filled == {1: Decimal("0.5"), 2: Decimal("0.25")}
        assert await run_statements.finish_active(lease, position_id, "task-1") is None

    async with sessions() as session:
        position = await repository.get_position(session, position_id)
        assert position is not None
        assert position.status == PositionStatus.ACTIVE
        assert position.exchange_uid == "uid-1"  # the first reading stands
        plan = await repository.get_plan(session, position_id)
        assert [(leg.position_idx, leg.submitted_at is not None) for leg in plan] == [
            (0, True),
            (1, False),
        ]
        trades = await session.scalar(
            select(func.count()).select_from(Trade).where(Trade.position_id == position_id)
        )
        assert trades == 2
        components = await repository.get_components(session, position_id)
        assert sorted((c.symbol, c.expected_quantity) for c in components) == [
            ("BTCUSDT", Decimal("0.5")),
            ("ETHUSDT", Decimal("0.25")),
        ]
        assert (
            await session.scalar(
                select(func.count())
                .select_from(PositionComponent)
                .where(PositionComponent.position_id == position_id)
            )
            == 2
        )


async def test_a_connection_that_does_not_hold_the_position_s_lock_cannot_claim_or_finish_it(
    engine: AsyncEngine, sessions: SessionScope
) -> None:
    mine = await pending_position(sessions, worker_opener())
    other = await pending_position(sessions, worker_opener())
    async with advisory_run_lock(engine)(mine) as lease:
        assert lease is not None
        # This connection holds `mine`'s lock, not `other`'s.
        assert await run_statements.claim_new(lease, other, "task-x") is None
        assert await run_statements.finish_active(lease, other, "task-x") is None
    async with sessions() as session:
        position = await repository.get_position(session, other)
        assert position is not None
        assert position.status == PositionStatus.PENDING
        assert position.claim is None


async def test_a_lease_not_seen_to_let_go_of_its_locks_is_closed_with_them(
    engine: AsyncEngine, sessions: SessionScope
) -> None:
    position_id = await pending_position(sessions, worker_opener())
    run_lock = advisory_run_lock(engine, confirm_timeout=0.2)
    async with run_lock(position_id) as lease:
        assert lease is not None
        # A statement still running on the lock connection when the run ends: the release
        # cannot get the connection within its time.
        busy = asyncio.ensure_future(lease.fetch("SELECT pg_sleep(2)"))
        await asyncio.sleep(0)
    # The connection was closed, not handed back to the pool holding the position's lock:
    # another run gets the lock once PostgreSQL has dropped it.
    deadline = time.monotonic() + 15
    while True:
        async with run_lock(position_id) as again:
            if again is not None:
                break
        assert time.monotonic() < deadline, "the position's lock was never let go"
        await asyncio.sleep(0.1)
    with pytest.raises(Exception):  # noqa: B017, PT011 - whichever way the closed connection fails it
        await busy


async def test_a_fill_s_values_are_the_statement_s_columns_in_order() -> None:
    """FillValues' fields are the arrays of the fills' INSERT, in its order."""
    assert [f.name for f in fields(run_statements.FillValues)] == [
        name for name, _ in run_statements._FILL_COLUMNS
    ]


async def test_a_fill_another_transaction_records_meanwhile_is_counted_once_in_the_snapshot(
    engine: AsyncEngine, sessions: SessionScope
) -> None:
    """A run finishes with a fill that reconciliation (another transaction) is recording at
    that moment: the ACTIVE statement waits for it, skips its own copy, and still counts the
    fill in the snapshot, once."""
    position_id = await pending_position(sessions, worker_opener())
    async with advisory_run_lock(engine)(position_id) as lease:
        assert lease is not None
        assert await run_statements.claim_new(lease, position_id, "task-1") is not None
        planned = [_leg(1, "BTCUSDT"), _leg(2, "ETHUSDT")]
        await run_statements.add_plan(lease, position_id, planned)
        fills = [_fill(planned[0], "0.5"), _fill(planned[1], "0.25")]
        dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        raw = await asyncpg.connect(dsn)
        try:
            transaction = raw.transaction()
            await transaction.start()
            await raw.execute(
                run_statements._RECORD_FILLS,
                position_id,
                *run_statements._columns(fills[1:], run_statements.FillValues),
            )
            finishing = asyncio.ensure_future(
                run_statements.finish_active(lease, position_id, "task-1", fills)
            )
            await eventually(
                lambda: _waits_for_a_lock(engine, lease.pid),
                message="the ACTIVE statement waiting for the other transaction's row",
            )
            await transaction.commit()
            filled = await finishing
        finally:
            await raw.close()
        assert filled == {1: Decimal("0.5"), 2: Decimal("0.25")}
    async with sessions() as session:
        components = await repository.get_components(session, position_id)
        assert sorted((c.symbol, c.expected_quantity) for c in components) == [
            ("BTCUSDT", Decimal("0.5")),
            ("ETHUSDT", Decimal("0.25")),
        ]
        trades = await session.scalar(
            select(func.count()).select_from(Trade).where(Trade.position_id == position_id)
        )
        assert trades == 2


async def _waits_for_a_lock(engine: AsyncEngine, pid: int) -> bool:
    async with engine.connect() as connection:
        result = await connection.execute(
            text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
        )
        return result.scalar_one_or_none() == "Lock"


async def test_a_fill_a_run_not_finishing_the_position_records_shows_in_its_version(
    engine: AsyncEngine, sessions: SessionScope
) -> None:
    """The fills a run read are recorded even when the position is not its to finish any
    more, and a new one moves `updated_at` (what GET's ETag is made of)."""
    position_id = await pending_position(sessions, worker_opener())
    async with advisory_run_lock(engine)(position_id) as lease:
        assert lease is not None
        assert await run_statements.claim_new(lease, position_id, "task-1") is not None
        planned = [_leg(1, "BTCUSDT")]
        await run_statements.add_plan(lease, position_id, planned)
        async with sessions() as session:
            before = await repository.get_position(session, position_id)
        assert before is not None
        fill = _fill(planned[0], "0.5")
        assert await run_statements.finish_active(lease, position_id, "task-2", [fill]) is None
    async with sessions() as session:
        after = await repository.get_position(session, position_id)
        assert after is not None
        assert after.status == PositionStatus.EXECUTING
        assert after.updated_at > before.updated_at
        trades = await session.scalar(
            select(func.count()).select_from(Trade).where(Trade.position_id == position_id)
        )
        assert trades == 1
