"""Reconciliation finds each kind of difference between our books and the exchange's
records, records a missing fill, and records nothing twice when run again."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

import httpx
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.config import get_settings
from service.credentials.service import store_credentials
from service.db import SessionScope
from service.execution import ExecutionDeps, Outcome, execute_position
from service.execution.reconciliation import reconcile_positions
from service.models import ReconciliationIssue, Trade
from service.positions import repository
from service.users.service import create_user_with_token
from tests.integration.conftest import api_client, execution_deps

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture
async def deps(
    engine: AsyncEngine, sessions: SessionScope, simulator_url: str
) -> AsyncIterator[ExecutionDeps]:
    async with execution_deps(engine, sessions, simulator_url) as deps:
        yield deps


async def _active_position(
    deps: ExecutionDeps, sessions: SessionScope, sim: httpx.AsyncClient
) -> tuple[uuid.UUID, str]:
    key, secret = f"RC{secrets.token_hex(8).upper()}", secrets.token_hex(16)
    await sim.post(
        "/sim/accounts", json={"api_key": key, "api_secret": secret, "balance": "1000000"}
    )
    async with sessions() as session:
        issued = await create_user_with_token(session, f"rec-{secrets.token_hex(5)}@example.com")
        user = issued.user
        await store_credentials(session, deps.cipher, user.id, api_key=key, api_secret=secret)
        position = await repository.add_position(
            session, user_id=user.id, index_code="DEFI", size=Decimal(3000), direction="short"
        )
        assert position is not None
    result = await execute_position(deps, position.id, task_id="rec")
    assert result.outcome is Outcome.ACTIVE
    return position.id, issued.token


async def _updated_at(sessions: SessionScope, position_id: uuid.UUID) -> object:
    async with sessions() as session:
        return (
            await session.execute(
                text("SELECT updated_at FROM synthetic_positions WHERE id = :id"),
                {"id": position_id},
            )
        ).scalar_one()


async def _issues(sessions: SessionScope, position_id: uuid.UUID) -> list[tuple[int, str]]:
    async with sessions() as session:
        rows = (
            await session.execute(
                select(ReconciliationIssue.order_link_id, ReconciliationIssue.kind).where(
                    ReconciliationIssue.position_id == position_id
                )
            )
        ).all()
    return sorted((int(link.rsplit("-", 1)[1]), kind) for link, kind in rows)


@pytest.mark.asyncio
async def test_each_kind_of_difference_is_found_once(
    deps: ExecutionDeps, sessions: SessionScope, sim: httpx.AsyncClient
) -> None:
    position_id, token = await _active_position(deps, sessions, sim)
    before_clean = await _updated_at(sessions, position_id)
    clean = await reconcile_positions(deps)
    assert not [m for m in clean.mismatches if m[0].startswith(position_id.hex)]
    # Nothing found: the position (its updated_at, and so its ETag) is left as it was.
    assert await _updated_at(sessions, position_id) == before_clean

    async with sessions() as session:
        params = {"id": position_id}
        # Leg 0: the fill is lost from our books. Leg 1: quantity and price differ.
        await session.execute(
            text("DELETE FROM trades WHERE position_id = :id AND leg = 0"), params
        )
        await session.execute(
            text(
                "UPDATE trades SET quantity = quantity + 1, price = price * 2 "
                "WHERE position_id = :id AND leg = 1"
            ),
            params,
        )
        # Leg 2: our books say it filled, the exchange never saw that orderLinkId.
        await session.execute(
            text(
                "UPDATE position_legs SET order_link_id = :link WHERE position_id = :id AND leg = 2"
            ),
            {"id": position_id, "link": f"{position_id.hex}-9"},
        )
        await session.execute(
            text("UPDATE trades SET order_link_id = :link WHERE position_id = :id AND leg = 2"),
            {"id": position_id, "link": f"{position_id.hex}-9"},
        )
        # Every real write moves updated_at; so does this one, and the position is due again.
        await session.execute(
            text("UPDATE synthetic_positions SET updated_at = clock_timestamp() WHERE id = :id"),
            params,
        )

    before = (
        REGISTRY.get_sample_value(
            "trader_reconciliation_mismatches_total", {"kind": "missing_fill"}
        )
        or 0.0
    )
    await reconcile_positions(deps)
    counted = REGISTRY.get_sample_value(
        "trader_reconciliation_mismatches_total", {"kind": "missing_fill"}
    )
    assert counted == before + 1  # counted in the metrics, once
    expected = [
        (0, "missing_fill"),
        (1, "price_mismatch"),
        (1, "quantity_mismatch"),
        (9, "unknown_order"),
    ]
    assert await _issues(sessions, position_id) == expected
    async with sessions() as session:
        restored = (
            await session.execute(
                select(Trade).where(Trade.position_id == position_id, Trade.leg == 0)
            )
        ).scalar_one()
    assert restored.quantity > 0  # the missing fill is recorded, from the exchange's record

    again = await reconcile_positions(deps)
    assert not [m for m in again.mismatches if m[0].startswith(position_id.hex)]
    assert await _issues(sessions, position_id) == expected
    async with sessions() as session:
        count = (
            await session.execute(
                select(func.count(Trade.id)).where(Trade.position_id == position_id)
            )
        ).scalar_one()
    assert count == 3

    # The position shows what was found, and the fill recorded since.
    async with api_client(get_settings()) as api:
        body = (
            await api.get(
                f"/api/positions/{position_id}", headers={"Authorization": f"Bearer {token}"}
            )
        ).json()
    assert sorted(i["kind"] for i in body["reconciliation"]) == sorted(k for _, k in expected)
    missing = next(i for i in body["reconciliation"] if i["kind"] == "missing_fill")
    assert missing["recorded"] is None
    assert missing["exchange"]["quantity"] == format(restored.quantity, "f")
    assert len(body["trades"]) == 3


async def _reconciled_at(sessions: SessionScope, ids: list[uuid.UUID]) -> dict[uuid.UUID, object]:
    async with sessions() as session:
        rows = await session.execute(
            text(
                "SELECT id, reconciled_at, updated_at FROM synthetic_positions WHERE id = ANY(:ids)"
            ),
            {"ids": ids},
        )
        return {row.id: (row.reconciled_at, row.updated_at) for row in rows}


@pytest.mark.asyncio
async def test_every_changed_position_is_covered_in_pages_and_only_once(
    deps: ExecutionDeps, sessions: SessionScope, sim: httpx.AsyncClient
) -> None:
    # More positions than a page: a fixed top-N would leave some out for ever.
    ids = [(await _active_position(deps, sessions, sim))[0] for _ in range(7)]
    before = await _reconciled_at(sessions, ids)
    assert all(reconciled is None for reconciled, _ in before.values())

    # A run whose deadline has passed reconciles nothing and says it did not finish.
    stopped = await reconcile_positions(
        deps, page_size=3, deadline=asyncio.get_running_loop().time()
    )
    assert not stopped.finished
    assert await _reconciled_at(sessions, ids) == before

    report = await reconcile_positions(deps, page_size=3)
    assert report.finished
    after = await _reconciled_at(sessions, ids)
    for position_id in ids:
        reconciled, updated = after[position_id]
        assert reconciled is not None
        assert reconciled >= updated
        # Nothing differed: updated_at (and so the ETag) did not move.
        assert updated == before[position_id][1]

    # Nothing changed since: not looked at again.
    await reconcile_positions(deps, page_size=3)
    assert await _reconciled_at(sessions, ids) == after

    # One changes: that one, and only that one, is due again.
    async with sessions() as session:
        await session.execute(
            text("UPDATE synthetic_positions SET updated_at = clock_timestamp() WHERE id = :id"),
            {"id": ids[3]},
        )
    await reconcile_positions(deps, page_size=3)
    again = await _reconciled_at(sessions, ids)
    assert [i for i in ids if again[i] != after[i]] == [ids[3]]


@pytest.mark.asyncio
async def test_a_change_is_reconciled_only_once_it_has_settled(
    deps: ExecutionDeps, sessions: SessionScope, sim: httpx.AsyncClient
) -> None:
    # Bybit's history can lag a moment: a fresh change waits RECONCILE_SETTLE_SECONDS.
    position_id, _ = await _active_position(deps, sessions, sim)
    await reconcile_positions(deps, settle_seconds=3600)
    assert (await _reconciled_at(sessions, [position_id]))[position_id][0] is None
    await reconcile_positions(deps, settle_seconds=0)
    assert (await _reconciled_at(sessions, [position_id]))[position_id][0] is not None


@pytest.mark.asyncio
async def test_what_reconciliation_records_moves_the_etag_even_if_the_position_moved_meanwhile(
    deps: ExecutionDeps, sessions: SessionScope, sim: httpx.AsyncClient
) -> None:
    from service.positions.reconciliation_rows import mark_reconciled

    position_id, _ = await _active_position(deps, sessions, sim)
    seen = await _updated_at(sessions, position_id)
    async with sessions() as session:  # another writer first (the sweep, a resumed run)
        await repository.mark_changed(session, position_id)
    moved = await _updated_at(sessions, position_id)
    async with sessions() as session:
        # Reconciliation recorded a fill or an issue on what it saw at `seen`.
        assert not await mark_reconciled(session, position_id, seen=seen, changed=True)  # type: ignore[arg-type]
    assert await _updated_at(sessions, position_id) != moved
    async with sessions() as session:
        # Nothing recorded: nothing moves.
        before = await _updated_at(sessions, position_id)
        assert not await mark_reconciled(session, position_id, seen=seen, changed=False)  # type: ignore[arg-type]
    assert await _updated_at(sessions, position_id) == before


@pytest.mark.asyncio
async def test_a_close_round_s_unrecorded_fill_is_found_and_recorded(
    deps: ExecutionDeps, sessions: SessionScope, sim: httpx.AsyncClient
) -> None:
    """A close round that ended with an order's fill unrecorded (its run died, its lookups
    kept failing): reconciliation finds it by orderLinkId and records it as a closing fill."""
    import structlog

    from service.bybit.auth import ApiCredentials
    from service.credentials.service import load_decrypted
    from service.execution.closing import ensure_close_plan
    from service.models import PositionStatus
    from service.positions.status import Transition, change_status

    position_id, token = await _active_position(deps, sessions, sim)
    closing = await change_status(
        sessions, position_id, Transition(PositionStatus.ACTIVE, PositionStatus.CLOSING)
    )
    assert closing is not None
    plan = await ensure_close_plan(deps, closing, structlog.stdlib.get_logger("test"))
    leg = plan[0]
    async with sessions() as session:
        credentials = await load_decrypted(session, deps.cipher, closing.user_id)
        await session.execute(
            text(
                "UPDATE position_close_legs SET submitted_at = now() "
                "WHERE position_id = :id AND round = 1 AND leg = :leg"
            ),
            {"id": position_id, "leg": leg.leg},
        )
    assert isinstance(credentials, ApiCredentials)
    await deps.exchange.create_market_order(
        credentials,
        symbol=leg.symbol,
        side=leg.side,
        qty=leg.quantity,
        order_link_id=leg.order_link_id,
        position_idx=leg.position_idx,
        reduce_only=True,
    )
    ended = await change_status(
        sessions,
        position_id,
        Transition(PositionStatus.CLOSING, PositionStatus.CLOSE_FAILED, error="test: run died"),
    )
    assert ended is not None

    report = await reconcile_positions(deps)

    assert (leg.order_link_id, "missing_fill") in report.mismatches
    async with sessions() as session:
        closing_fills = (
            (
                await session.execute(
                    select(Trade).where(Trade.position_id == position_id, Trade.phase == "close")
                )
            )
            .scalars()
            .all()
        )
    assert [(t.order_link_id, t.side, t.quantity) for t in closing_fills] == [
        (leg.order_link_id, "Buy", leg.quantity)  # DEFI is short: its close buys back
    ]
    async with api_client(get_settings()) as api:
        body = (
            await api.get(
                f"/api/positions/{position_id}", headers={"Authorization": f"Bearer {token}"}
            )
        ).json()
    shown = next(x for x in body["legs"] if x["leg"] == leg.leg)
    assert Decimal(shown["held_quantity"]) == 0
    assert Decimal(shown["closed_quantity"]) == leg.quantity
