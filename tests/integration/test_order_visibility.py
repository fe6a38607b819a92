"""Bybit acknowledges an order before it fills and lists it a moment later: the executor waits
for the fill and never takes an order not visible yet for one never placed."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio

from service.db import SessionScope
from service.execution import ExecutionDeps, Outcome, execute_position
from tests.integration.test_partial_fills import _orders, _position, deps  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


@pytest_asyncio.fixture
async def slow_lists(sim: httpx.AsyncClient) -> AsyncIterator[None]:
    await sim.put(
        "/sim/config",
        json={"order_visible_ms": 300, "fill_delay_ms": 600, "history_lag_ms": 1500},
    )
    yield
    await sim.put(
        "/sim/config", json={"order_visible_ms": 0, "fill_delay_ms": 0, "history_lag_ms": 0}
    )


async def test_an_order_seen_new_is_awaited_until_filled(
    deps: ExecutionDeps,  # noqa: F811
    sessions: SessionScope,
    sim: httpx.AsyncClient,
    slow_lists: None,
) -> None:
    position_id, key, _ = await _position(deps, sessions, sim)
    result = await execute_position(deps, position_id, task_id="late")
    assert result.outcome is Outcome.ACTIVE, result.detail
    links = [o["orderLinkId"] for o in await _orders(sim, key)]
    assert len(links) == 2
    assert len(set(links)) == 2


async def test_a_lost_reply_for_an_order_not_listed_yet_is_not_sent_twice(
    deps: ExecutionDeps,  # noqa: F811
    sessions: SessionScope,
    sim: httpx.AsyncClient,
    slow_lists: None,
) -> None:
    position_id, key, _ = await _position(deps, sessions, sim)
    await sim.post(
        "/sim/faults",
        json={"path": "/v5/order/create", "kind": "drop_after_fill", "api_key": key},
    )
    outcomes = []
    for _ in range(4):
        result = await execute_position(deps, position_id, task_id="lost")
        outcomes.append(result.outcome)
        if result.outcome is not Outcome.RETRY:
            break
    assert outcomes[-1] is Outcome.ACTIVE, outcomes
    links = [o["orderLinkId"] for o in await _orders(sim, key)]
    assert sorted(links) == sorted(set(links))
    assert len(links) == 2


async def test_an_undocumented_code_for_an_order_that_landed_is_not_a_failure(
    deps: ExecutionDeps,  # noqa: F811
    sessions: SessionScope,
    sim: httpx.AsyncClient,
    slow_lists: None,
) -> None:
    position_id, key, _ = await _position(deps, sessions, sim)
    await sim.post(
        "/sim/faults",
        json={
            "path": "/v5/order/create",
            "kind": "retcode_after_fill",
            "retCode": 99999,
            "api_key": key,
        },
    )
    result = await execute_position(deps, position_id, task_id="unknown")
    assert result.outcome is Outcome.ACTIVE, result.detail
    assert len(await _orders(sim, key)) == 2
