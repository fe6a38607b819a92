"""End to end: a real worker process, the API over HTTP, PostgreSQL, Redis, the simulator."""

from __future__ import annotations

import uuid
from decimal import Decimal

import httpx
import pytest
from sqlalchemy import select

from service.models import PositionComponent, Trade
from tests.support import ApiUser, ServiceProcess, eventually, run_command

pytestmark = pytest.mark.integration


async def _poll_final(client: httpx.AsyncClient, url: str, user: ApiUser) -> dict[str, object]:
    seen: list[str] = []

    async def final() -> dict[str, object] | None:
        body = (await client.get(url, headers=user.headers)).json()
        if not seen or seen[-1] != body["status"]:
            seen.append(body["status"])
        return body if body["status"] in ("ACTIVE", "FAILED") else None

    body = await eventually(final, timeout=60, message="a final status")
    body["_seen"] = seen
    return body


@pytest.mark.asyncio
async def test_position_goes_active_with_rows_matching_the_exchange(
    api_url: str,
    worker: ServiceProcess,
    funded_user: ApiUser,
    sim: httpx.AsyncClient,
    sessions: object,
) -> None:
    async with httpx.AsyncClient(base_url=api_url, timeout=10) as client:
        stored = await client.put(
            "/api/credentials",
            json={"api_key": funded_user.api_key, "api_secret": funded_user.api_secret},
            headers=funded_user.headers,
        )
        assert stored.status_code == 200, stored.text
        assert funded_user.api_secret not in stored.text
        assert funded_user.api_key not in stored.text

        created = await client.post(
            "/api/positions",
            json={"index": "TOP10", "size": "5000", "direction": "long"},
            headers=funded_user.headers,
        )
        assert created.status_code == 202, created.text
        position = created.json()
        assert position["status"] == "PENDING"
        assert created.headers["Location"] == f"/api/positions/{position['id']}"

        body = await _poll_final(client, created.headers["Location"], funded_user)

    assert body["status"] == "ACTIVE", body
    orders = (await sim.get("/sim/orders", params={"api_key": funded_user.api_key})).json()[
        "orders"
    ]
    # One order per component, none twice.
    assert len(orders) == 10
    assert len({o["orderLinkId"] for o in orders}) == 10
    by_link = {o["orderLinkId"]: o for o in orders}

    position_id = uuid.UUID(str(body["id"]))
    async with sessions() as session:  # type: ignore[operator]
        trades = (
            (await session.execute(select(Trade).where(Trade.position_id == position_id)))
            .scalars()
            .all()
        )
        components = (
            (
                await session.execute(
                    select(PositionComponent).where(PositionComponent.position_id == position_id)
                )
            )
            .scalars()
            .all()
        )
    assert len(trades) == 10
    for trade in trades:
        order = by_link[trade.order_link_id]
        assert trade.bybit_order_id == order["orderId"]
        assert trade.symbol == order["symbol"]
        assert trade.side == order["side"] == "Buy"
        assert trade.quantity == Decimal(order["cumExecQty"])
        assert trade.price == Decimal(order["avgPrice"])
    assert {(c.symbol, c.expected_quantity) for c in components} == {
        (o["symbol"], Decimal(o["qty"])) for o in orders
    }
    # The API shows the same, decimals as strings.
    assert len(body["trades"]) == 10
    assert all(isinstance(t["price"], str) for t in body["trades"])  # type: ignore[union-attr]
    assert {c["symbol"] for c in body["components"]} == {o["symbol"] for o in orders}  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_permanent_error_fails_the_position(
    api_url: str,
    worker: ServiceProcess,
    funded_user: ApiUser,
    sim: httpx.AsyncClient,
) -> None:
    # Too little money for the basket at 1x: Bybit's insufficient-balance answer.
    await sim.post(
        "/sim/accounts",
        json={
            "api_key": funded_user.api_key,
            "api_secret": funded_user.api_secret,
            "balance": "10",
        },
    )
    async with httpx.AsyncClient(base_url=api_url, timeout=10) as client:
        await client.put(
            "/api/credentials",
            json={"api_key": funded_user.api_key, "api_secret": funded_user.api_secret},
            headers=funded_user.headers,
        )
        created = await client.post(
            "/api/positions",
            json={"index": "BLUECHIP", "size": "1000", "direction": "short"},
            headers=funded_user.headers,
        )
        body = await _poll_final(client, created.headers["Location"], funded_user)
    assert body["status"] == "FAILED"
    assert "pre-flight: available balance 10 USDT does not cover" in str(body["error"])
    assert body["trades"] == []
    orders = (await sim.get("/sim/orders", params={"api_key": funded_user.api_key})).json()[
        "orders"
    ]
    assert orders == []


def test_users_create_prints_the_token_on_the_last_line(service_env: dict[str, str]) -> None:
    result = run_command(service_env, "users", "create", "cli-user@example.com")
    token = result.stdout.strip().splitlines()[-1]
    assert token.startswith("sit_")
    assert len(token) > 30
