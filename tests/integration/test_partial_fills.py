"""Partial fills are completed or reported, never hidden: a market order on a thin book fills
in part (Bybit's IOC within its price band), the remainder is sent again as new orders with
their own orderLinkIds, and what cannot be traded is the leg's shortfall."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine

from service.config import get_settings
from service.credentials.service import store_credentials
from service.db import SessionScope
from service.execution import ExecutionDeps, Outcome, execute_position, remainder_link_id
from service.positions import repository
from service.users.service import create_user_with_token
from tests.integration.conftest import api_client, execution_deps

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


@pytest_asyncio.fixture
async def deps(
    engine: AsyncEngine, sessions: SessionScope, simulator_url: str
) -> AsyncIterator[ExecutionDeps]:
    async with execution_deps(engine, sessions, simulator_url) as deps:
        yield deps


@pytest_asyncio.fixture
async def thin_btc(sim: httpx.AsyncClient) -> AsyncIterator[Any]:
    """Set BTCUSDT's book (depth per order, levels); restored afterwards."""

    async def book(depth: str | None, levels: int = 1) -> None:
        response = await sim.put(
            "/sim/instruments/BTCUSDT", json={"bookDepth": depth, "bookLevels": levels}
        )
        response.raise_for_status()

    yield book
    await book(None, 1)


async def _position(
    deps: ExecutionDeps, sessions: SessionScope, sim: httpx.AsyncClient, size: str = "2000"
) -> tuple[uuid.UUID, str, str]:
    key, secret = f"PF{secrets.token_hex(8).upper()}", secrets.token_hex(16)
    await sim.post(
        "/sim/accounts", json={"api_key": key, "api_secret": secret, "balance": "1000000"}
    )
    async with sessions() as session:
        issued = await create_user_with_token(session, f"pf-{secrets.token_hex(5)}@example.com")
        await store_credentials(
            session, deps.cipher, issued.user.id, api_key=key, api_secret=secret
        )
        position = await repository.add_position(
            session,
            user_id=issued.user.id,
            index_code="BLUECHIP",
            size=Decimal(size),
            direction="long",
        )
        assert position is not None
    return position.id, key, issued.token


async def _orders(sim: httpx.AsyncClient, key: str) -> list[dict[str, Any]]:
    return list((await sim.get("/sim/orders", params={"api_key": key})).json()["orders"])


async def _get(position_id: uuid.UUID, token: str) -> dict[str, Any]:
    async with api_client(get_settings()) as api:
        response = await api.get(
            f"/api/positions/{position_id}", headers={"Authorization": f"Bearer {token}"}
        )
    assert response.status_code == 200
    return dict(response.json())


async def test_the_remainder_of_a_partial_fill_is_sent_again_until_complete(
    deps: ExecutionDeps, sessions: SessionScope, sim: httpx.AsyncClient, thin_btc: Any
) -> None:
    position_id, key, token = await _position(deps, sessions, sim)
    plan_btc = Decimal("0.012")  # 1,200 USDT of BTC at the simulator's 100,000
    await thin_btc("0.005", levels=3)  # 0.005 per order, over three executions
    result = await execute_position(deps, position_id, task_id="pf")
    assert result.outcome is Outcome.ACTIVE
    btc = [o for o in await _orders(sim, key) if o["symbol"] == "BTCUSDT"]
    assert [o["orderLinkId"] for o in btc] == [
        f"{position_id.hex}-0",
        remainder_link_id(position_id, 0, 1),
        remainder_link_id(position_id, 0, 2),
    ]
    assert [Decimal(o["cumExecQty"]) for o in btc] == [
        Decimal("0.005"),
        Decimal("0.005"),
        Decimal("0.002"),
    ]
    assert all(len(o["orderLinkId"]) <= 36 for o in btc)
    body = await _get(position_id, token)
    leg = body["legs"][0]
    assert (leg["planned_quantity"], leg["filled_quantity"], leg["shortfall_quantity"]) == (
        format(plan_btc, "f"),
        "0.012",
        "0.000",
    )
    assert body["shortfall"] is False
    btc_trades = [t for t in body["trades"] if t["symbol"] == "BTCUSDT"]
    assert len(btc_trades) == 3  # every order's fill, each with its own orderLinkId
    assert all(t["fee_coin"] == "USDT" for t in btc_trades)
    components = {c["symbol"]: c["expected_quantity"] for c in body["components"]}
    assert components["BTCUSDT"] == "0.012"


async def test_what_cannot_be_traded_is_the_leg_s_shortfall_and_said_so(
    deps: ExecutionDeps, sessions: SessionScope, sim: httpx.AsyncClient, thin_btc: Any
) -> None:
    position_id, key, token = await _position(deps, sessions, sim)
    await thin_btc("0.002")  # four orders of 0.002: 0.008 of the planned 0.012
    result = await execute_position(deps, position_id, task_id="pf")
    assert result.outcome is Outcome.ACTIVE
    btc = [o for o in await _orders(sim, key) if o["symbol"] == "BTCUSDT"]
    assert len(btc) == 1 + deps.remainder_attempts
    body = await _get(position_id, token)
    leg = body["legs"][0]
    assert (leg["filled_quantity"], leg["shortfall_quantity"]) == ("0.008", "0.004")
    assert body["shortfall"] is True
    # The snapshot says what is held, not what was planned.
    components = {c["symbol"]: c["expected_quantity"] for c in body["components"]}
    assert components["BTCUSDT"] == "0.008"
    exposure = {e["symbol"]: e["quantity"] for e in body["exposure"]}
    assert exposure["BTCUSDT"] == "0.008"


async def test_a_remainder_too_small_to_trade_is_not_sent(
    deps: ExecutionDeps, sessions: SessionScope, sim: httpx.AsyncClient, thin_btc: Any
) -> None:
    position_id, key, token = await _position(deps, sessions, sim)
    # 0.011 of 0.012 fills: the 0.001 left is worth 100 USDT, tradeable; make it not:
    await sim.put("/sim/instruments/BTCUSDT", json={"minNotionalValue": "150"})
    try:
        await thin_btc("0.011")
        result = await execute_position(deps, position_id, task_id="pf")
    finally:
        await sim.put("/sim/instruments/BTCUSDT", json={"minNotionalValue": "5"})
    assert result.outcome is Outcome.ACTIVE
    btc = [o for o in await _orders(sim, key) if o["symbol"] == "BTCUSDT"]
    assert len(btc) == 1
    body = await _get(position_id, token)
    assert body["legs"][0]["shortfall_quantity"] == "0.001"
    assert body["shortfall"] is True


async def test_a_remainder_order_whose_reply_is_lost_is_looked_up_not_sent_twice(
    deps: ExecutionDeps, sessions: SessionScope, sim: httpx.AsyncClient, thin_btc: Any
) -> None:
    position_id, key, _ = await _position(deps, sessions, sim)
    await thin_btc("0.007")
    # The first remainder order (the second order/create of the account) is carried out,
    # then its reply is lost.
    await sim.post(
        "/sim/faults",
        json={"path": "/v5/order/create", "kind": "drop_after_fill", "skip": 1, "api_key": key},
    )
    first = await execute_position(deps, position_id, task_id="pf")
    if first.outcome is Outcome.RETRY:
        first = await execute_position(deps, position_id, task_id="pf")
    assert first.outcome is Outcome.ACTIVE
    links = [o["orderLinkId"] for o in await _orders(sim, key)]
    assert len(links) == len(set(links))
    assert remainder_link_id(position_id, 0, 1) in links


async def test_a_remainder_sent_before_a_crash_is_recorded_whatever_the_price_now(
    deps: ExecutionDeps, sessions: SessionScope, sim: httpx.AsyncClient, thin_btc: Any
) -> None:
    position_id, key, token = await _position(deps, sessions, sim)
    await thin_btc("0.005")
    # The first remainder order is sent and fills, then its fill cannot be read: the run
    # ends (as a crash would) with the order on the exchange and not in the books.
    await sim.post(
        "/sim/faults",
        json={
            "path": "/v5/order/realtime",
            "kind": "http_status",
            "status": 503,
            "skip": 1,
            "times": deps.call_attempts,
            "api_key": key,
        },
    )
    first = await execute_position(deps, position_id, task_id="pf")
    assert first.outcome is Outcome.RETRY
    # The price has fallen: a new remainder order could not be sent now.
    await sim.put("/sim/instruments/BTCUSDT", json={"minNotionalValue": "10000"})
    try:
        second = await execute_position(deps, position_id, task_id="pf")
    finally:
        await sim.put("/sim/instruments/BTCUSDT", json={"minNotionalValue": "5"})
    assert second.outcome is Outcome.ACTIVE, second.detail
    body = await _get(position_id, token)
    btc = [t for t in body["trades"] if t["symbol"] == "BTCUSDT"]
    assert sorted(t["quantity"] for t in btc) == ["0.005", "0.005"]  # both orders recorded
    components = {c["symbol"]: c["expected_quantity"] for c in body["components"]}
    assert components["BTCUSDT"] == "0.010"
    assert len([o for o in await _orders(sim, key) if o["symbol"] == "BTCUSDT"]) == 2


async def test_a_refused_remainder_is_shortfall_and_the_basket_goes_on(
    deps: ExecutionDeps, sessions: SessionScope, sim: httpx.AsyncClient, thin_btc: Any
) -> None:
    position_id, key, token = await _position(deps, sessions, sim)
    await thin_btc("0.005")
    # The remainder order (the account's second order/create) is refused: the price moved
    # below the minimum order value between reading it and sending.
    await sim.post(
        "/sim/faults",
        json={
            "path": "/v5/order/create",
            "kind": "retcode",
            "retCode": 110094,
            "retMsg": "Order does not meet minimum order value",
            "skip": 1,
            "api_key": key,
        },
    )
    result = await execute_position(deps, position_id, task_id="pf")
    assert result.outcome is Outcome.ACTIVE, result.detail
    body = await _get(position_id, token)
    assert body["legs"][0]["shortfall_quantity"] == "0.007"
    assert body["legs"][1]["shortfall_quantity"] == "0.00"  # ETH traded all the same
    assert body["shortfall"] is True


async def test_a_leg_that_fills_nothing_leaves_the_next_leg_unmarked(
    deps: ExecutionDeps, sessions: SessionScope, sim: httpx.AsyncClient, thin_btc: Any
) -> None:
    # The next leg's order is marked submitted ahead, while this leg's fill is read; when
    # this leg then fails, that order was never sent and its mark is withdrawn, so the
    # failed basket does not look as if it might hold it.
    position_id, key, _ = await _position(deps, sessions, sim)
    await thin_btc("0")  # BTCUSDT (leg 0): the market order fills nothing
    result = await execute_position(deps, position_id, task_id="pf-none")
    assert result.outcome is Outcome.FAILED
    assert [o["symbol"] for o in await _orders(sim, key)] == ["BTCUSDT"]
    async with sessions() as session:
        plan = {leg.leg: leg for leg in await repository.get_plan(session, position_id)}
    assert plan[0].submitted_at is not None
    assert plan[1].submitted_at is None  # ETHUSDT: never sent, not marked
