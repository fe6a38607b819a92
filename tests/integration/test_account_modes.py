"""Account modes checked in pre-flight, before any write on the exchange: the position mode
(positionIdx), the margin mode (where the available balance is read), positions the user
already holds on the basket's symbols, leverage set only where it is not 1x; and a basket that
fills at once costs at most legs x 2 + 3 exchange requests."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncEngine

from service.bybit.client import BybitClient
from service.credentials.service import store_credentials
from service.db import SessionScope
from service.execution import ExecutionDeps, Outcome, execute_position
from service.market.data import MarketData
from service.positions import repository
from service.rate_limits import RedisCallGate
from service.users.service import create_user_with_token
from tests.conftest import TEST_ENV
from tests.integration.conftest import execution_deps

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


@pytest_asyncio.fixture
async def deps(
    engine: AsyncEngine, sessions: SessionScope, simulator_url: str
) -> AsyncIterator[ExecutionDeps]:
    async with execution_deps(
        engine, sessions, simulator_url, as_a_worker=True, market_max_age_seconds=600
    ) as deps:
        yield deps


async def _account(sim: httpx.AsyncClient, **options: object) -> tuple[str, str]:
    key, secret = f"AM{secrets.token_hex(8).upper()}", secrets.token_hex(16)
    response = await sim.post(
        "/sim/accounts",
        json={"api_key": key, "api_secret": secret, "balance": "1000000", **options},
    )
    response.raise_for_status()
    return key, secret


async def _position(
    deps: ExecutionDeps,
    sessions: SessionScope,
    key: str,
    secret: str,
    *,
    index: str = "BLUECHIP",
    size: str = "2000",
    direction: str = "long",
) -> uuid.UUID:
    async with sessions() as session:
        issued = await create_user_with_token(session, f"am-{secrets.token_hex(5)}@example.com")
        await store_credentials(
            session, deps.cipher, issued.user.id, api_key=key, api_secret=secret
        )
        position = await repository.add_position(
            session,
            user_id=issued.user.id,
            index_code=index,
            size=Decimal(size),
            direction=direction,
        )
        assert position is not None
    return position.id


async def _orders(sim: httpx.AsyncClient, key: str) -> list[dict[str, Any]]:
    return list((await sim.get("/sim/orders", params={"api_key": key})).json()["orders"])


async def _calls(sim: httpx.AsyncClient, key: str) -> list[dict[str, Any]]:
    return list((await sim.get("/sim/calls", params={"api_key": key})).json()["calls"])


async def _error(sessions: SessionScope, position_id: uuid.UUID) -> str:
    async with sessions() as session:
        position = await repository.get_position(session, position_id)
    assert position is not None
    return position.error or ""


@pytest.mark.parametrize(("direction", "idx"), [("long", 1), ("short", 2)])
async def test_a_hedge_mode_account_gets_its_position_idx(
    deps: ExecutionDeps,
    sessions: SessionScope,
    sim: httpx.AsyncClient,
    direction: str,
    idx: int,
) -> None:
    key, secret = await _account(sim, position_mode="hedge")
    position_id = await _position(deps, sessions, key, secret, direction=direction)
    result = await execute_position(deps, position_id, task_id="hedge")
    assert result.outcome is Outcome.ACTIVE, result.detail
    assert [o["positionIdx"] for o in await _orders(sim, key)] == [idx, idx]


async def test_an_isolated_margin_account_s_balance_is_read_from_its_coin(
    deps: ExecutionDeps, sessions: SessionScope, sim: httpx.AsyncClient
) -> None:
    key, secret = await _account(sim, margin_mode="ISOLATED_MARGIN")
    position_id = await _position(deps, sessions, key, secret)
    result = await execute_position(deps, position_id, task_id="isolated")
    assert result.outcome is Outcome.ACTIVE, result.detail

    poor_key, poor_secret = await _account(sim, margin_mode="ISOLATED_MARGIN")
    await sim.post(
        "/sim/accounts",
        json={
            "api_key": poor_key,
            "api_secret": poor_secret,
            "balance": "1500",
            "margin_mode": "ISOLATED_MARGIN",
        },
    )
    poor = await _position(deps, sessions, poor_key, poor_secret)
    refused = await execute_position(deps, poor, task_id="isolated-poor")
    assert refused.outcome is Outcome.FAILED
    error = await _error(sessions, poor)
    assert "available balance 1500" in error
    assert "isolated margin" in error
    assert await _orders(sim, poor_key) == []


async def test_an_opposite_position_in_one_way_mode_refuses_the_basket(
    deps: ExecutionDeps, sessions: SessionScope, sim: httpx.AsyncClient
) -> None:
    key, secret = await _account(sim)
    await sim.post(
        "/sim/positions",
        json={"api_key": key, "symbol": "ETHUSDT", "side": "Sell", "size": "1", "leverage": "1"},
    )
    position_id = await _position(deps, sessions, key, secret)
    result = await execute_position(deps, position_id, task_id="netting")
    assert result.outcome is Outcome.FAILED
    error = await _error(sessions, position_id)
    assert "ETHUSDT" in error
    assert "hedge mode" in error
    assert await _orders(sim, key) == []  # refused before the first order
    leverage_calls = [c for c in await _calls(sim, key) if c["path"].endswith("set-leverage")]
    assert leverage_calls == []  # and before any write on the exchange


async def test_an_opposite_position_in_hedge_mode_is_held_apart(
    deps: ExecutionDeps, sessions: SessionScope, sim: httpx.AsyncClient
) -> None:
    key, secret = await _account(sim, position_mode="hedge")
    await sim.post(
        "/sim/positions",
        json={"api_key": key, "symbol": "ETHUSDT", "side": "Sell", "size": "1", "leverage": "1"},
    )
    position_id = await _position(deps, sessions, key, secret)
    result = await execute_position(deps, position_id, task_id="hedged")
    assert result.outcome is Outcome.ACTIVE, result.detail


async def test_a_held_position_at_other_leverage_is_not_re_margined(
    deps: ExecutionDeps, sessions: SessionScope, sim: httpx.AsyncClient
) -> None:
    key, secret = await _account(sim)
    await sim.post(
        "/sim/positions",
        json={"api_key": key, "symbol": "BTCUSDT", "side": "Buy", "size": "0.01", "leverage": "5"},
    )
    position_id = await _position(deps, sessions, key, secret)
    result = await execute_position(deps, position_id, task_id="margin")
    assert result.outcome is Outcome.FAILED
    error = await _error(sessions, position_id)
    assert "BTCUSDT at 5x" in error
    assert await _orders(sim, key) == []


async def test_a_ten_leg_basket_costs_at_most_legs_times_two_plus_three_requests(
    deps: ExecutionDeps, sessions: SessionScope, sim: httpx.AsyncClient
) -> None:
    key, secret = await _account(sim)
    first = await _position(deps, sessions, key, secret, index="TOP10", size="5000")
    assert (await execute_position(deps, first, task_id="warm")).outcome is Outcome.ACTIVE
    # The first basket of an account sets 1x on each symbol (Bybit's default is 10x); from
    # then on leverage is remembered, and market data comes from the shared snapshot.
    before = len(await _calls(sim, key))
    second = await _position(deps, sessions, key, secret, index="TOP10", size="5000")
    assert (await execute_position(deps, second, task_id="budget")).outcome is Outcome.ACTIVE
    calls = (await _calls(sim, key))[before:]
    paths = [c["path"] for c in calls]
    assert len(calls) <= 10 * 2 + 3, paths
    assert paths.count("/v5/order/create") == 10
    assert "/v5/position/set-leverage" not in paths


async def test_position_modes_are_per_symbol(
    deps: ExecutionDeps, sessions: SessionScope, sim: httpx.AsyncClient
) -> None:
    key, secret = await _account(sim, hedge_symbols=["ETHUSDT"])
    position_id = await _position(deps, sessions, key, secret)
    result = await execute_position(deps, position_id, task_id="mixed")
    assert result.outcome is Outcome.ACTIVE, result.detail
    assert {o["symbol"]: o["positionIdx"] for o in await _orders(sim, key)} == {
        "BTCUSDT": 0,
        "ETHUSDT": 1,
    }


async def test_a_position_mode_changed_since_it_was_read_is_corrected_by_the_order(
    deps: ExecutionDeps, sessions: SessionScope, sim: httpx.AsyncClient
) -> None:
    from service.bybit.auth import ApiCredentials

    key, secret = await _account(sim, hedge_symbols=["ETHUSDT"])
    # What an earlier basket learnt, before the user switched ETHUSDT to hedge mode.
    account = ApiCredentials(api_key=key, api_secret=secret).account
    await deps.memo.remember_hedge_modes(account, {"ETHUSDT": False})
    position_id = await _position(deps, sessions, key, secret)
    result = await execute_position(deps, position_id, task_id="switched")
    assert result.outcome is Outcome.ACTIVE, result.detail
    eth = [o for o in await _orders(sim, key) if o["symbol"] == "ETHUSDT"]
    assert [o["positionIdx"] for o in eth] == [1]  # refused with 0 (placing nothing), sent with 1
    assert (await deps.memo.hedge_modes(account, ["ETHUSDT"])) == {"ETHUSDT": True}


async def test_a_portfolio_margin_account_has_no_leverage_to_set(
    deps: ExecutionDeps, sessions: SessionScope, sim: httpx.AsyncClient
) -> None:
    key, secret = await _account(sim, margin_mode="PORTFOLIO_MARGIN")
    position_id = await _position(deps, sessions, key, secret)
    result = await execute_position(deps, position_id, task_id="pm")
    assert result.outcome is Outcome.ACTIVE, result.detail


async def test_waiting_out_an_ip_ban_uses_no_attempt(
    deps: ExecutionDeps, sessions: SessionScope, sim: httpx.AsyncClient
) -> None:
    from dataclasses import replace

    key, secret = await _account(sim)
    await sim.post(
        "/sim/faults",
        json={"path": "/v5/order/create", "kind": "http_status", "status": 403, "api_key": key},
    )
    redis = aioredis.from_url(TEST_ENV["REDIS_URL"])
    try:
        gate = RedisCallGate(redis, prefix=f"test-limits-{secrets.token_hex(4)}")
        exchange = BybitClient(
            deps.exchange._http, deps.exchange._base_url, ip_ban_seconds=0.5, gate=gate
        )
        banned = replace(deps, exchange=exchange, market=MarketData(exchange))
        position_id = await _position(banned, sessions, key, secret)
        first = await execute_position(banned, position_id, task_id="ban")
        assert first.outcome is Outcome.RETRY
        assert first.retry_in is not None
        assert first.retry_in <= 0.5  # after the ban, not on the retry schedule
        async with sessions() as session:
            paused = await repository.get_position(session, position_id)
        assert paused is not None
        assert paused.attempts == 0  # the wait used no attempt

        async def done() -> Any:
            result = await execute_position(banned, position_id, task_id="ban")
            return result if result.outcome is Outcome.ACTIVE else None

        from tests.support import eventually

        finished = await eventually(done, timeout=10, interval=0.2, message="ACTIVE after the ban")
        assert finished.outcome is Outcome.ACTIVE
    finally:
        await redis.aclose()
