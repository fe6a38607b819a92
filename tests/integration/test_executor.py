"""The trade executor end to end: a real worker process (prefork), PostgreSQL, Redis and the
simulator, with faults injected on the test's own simulator account."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import select

from service.models import PositionComponent, Trade
from tests.conftest import TEST_ENV
from tests.integration.conftest import start_worker
from tests.integration.run_safety import send_copies
from tests.support import ApiUser, ServiceProcess, eventually

pytestmark = pytest.mark.integration

BLUECHIP = {"index": "BLUECHIP", "size": "2000", "direction": "long"}
TOP10 = {"index": "TOP10", "size": "5000", "direction": "long"}


@pytest_asyncio.fixture
async def trader(api: httpx.AsyncClient, funded_user: ApiUser) -> ApiUser:
    response = await api.put(
        "/api/credentials",
        json={"api_key": funded_user.api_key, "api_secret": funded_user.api_secret},
        headers=funded_user.headers,
    )
    assert response.status_code == 200
    return funded_user


@pytest.fixture
def beat(service_env: dict[str, str], tmp_path: Path) -> Iterator[ServiceProcess]:
    process = ServiceProcess(
        ["beat", "-s", str(tmp_path / "beat-schedule")], service_env, tmp_path / "beat.log"
    )
    try:
        yield process
    finally:
        process.stop()


async def _open(api: httpx.AsyncClient, user: ApiUser, body: dict[str, str]) -> str:
    response = await api.post("/api/positions", json=body, headers=user.headers)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def _final(api: httpx.AsyncClient, user: ApiUser, position_id: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        body = (await api.get(f"/api/positions/{position_id}", headers=user.headers)).json()
        return body if body["status"] in ("ACTIVE", "FAILED") else None

    return await eventually(probe, timeout=90, interval=0.1, message="a final status")


async def _orders(sim: httpx.AsyncClient, user: ApiUser) -> list[dict[str, Any]]:
    return list((await sim.get("/sim/orders", params={"api_key": user.api_key})).json()["orders"])


async def _fault(sim: httpx.AsyncClient, user: ApiUser, **fault: object) -> None:
    fault.setdefault("path", "/v5/order/create")
    response = await sim.post("/sim/faults", json={**fault, "api_key": user.api_key})
    response.raise_for_status()


async def _trades(sessions: Any, position_id: str) -> list[Trade]:
    async with sessions() as session:
        result = await session.execute(
            select(Trade).where(Trade.position_id == uuid.UUID(position_id)).order_by(Trade.leg)
        )
        return list(result.scalars().all())


def _events(process: ServiceProcess) -> list[dict[str, Any]]:
    events = []
    for line in process.output().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
        else:
            # Celery's own shutdown notice goes to stderr as plain text; nothing else may.
            assert not line.strip() or line.startswith("worker: "), line
    return events


def _assert_one_order_per_leg(orders: list[dict[str, Any]], legs: int) -> None:
    links = [o["orderLinkId"] for o in orders]
    assert len(links) == legs, links
    assert len(set(links)) == legs


@pytest.mark.asyncio
async def test_happy_path_is_audited_without_secrets(
    api: httpx.AsyncClient,
    trader: ApiUser,
    sim: httpx.AsyncClient,
    worker: ServiceProcess,
    sessions: Any,
) -> None:
    position_id = await _open(api, trader, BLUECHIP)
    body = await _final(api, trader, position_id)
    assert body["status"] == "ACTIVE"
    orders = await _orders(sim, trader)
    _assert_one_order_per_leg(orders, 2)
    trades = await _trades(sessions, position_id)
    assert [(t.order_link_id, t.quantity) for t in trades] == [
        (o["orderLinkId"], Decimal(o["cumExecQty"])) for o in orders
    ]
    worker.stop()
    events = [e for e in _events(worker) if e.get("position_id") == position_id]
    names = [e["event"] for e in events]
    assert names.count("leg.submitted") == 2
    assert names.count("leg.filled") == 2
    assert [e["to_status"] for e in events if e["event"] == "position.status_changed"] == [
        "EXECUTING",
        "ACTIVE",
    ]
    for event in (e for e in events if e["event"] == "leg.filled"):
        for field in (
            "position_id",
            "leg",
            "symbol",
            "side",
            "qty",
            "order_link_id",
            "bybit_order_id",
            "price",
            "latency_ms",
            "attempt",
            "timestamp",
            "level",
        ):
            assert field in event, (field, event)
        assert isinstance(event["price"], str)
    text = worker.output()
    assert trader.api_secret not in text
    assert trader.api_key not in text
    assert TEST_ENV["CREDENTIALS_PRIVATE_KEYS"] not in text
    assert "X-BAPI-SIGN" not in text


@pytest.mark.asyncio
async def test_permanent_error_on_leg_k_stops_there(
    api: httpx.AsyncClient,
    trader: ApiUser,
    sim: httpx.AsyncClient,
    worker: ServiceProcess,
    sessions: Any,
) -> None:
    await _fault(sim, trader, kind="retcode", retCode=110007, retMsg="ab not enough", skip=3)
    position_id = await _open(api, trader, TOP10)
    body = await _final(api, trader, position_id)
    assert body["status"] == "FAILED"
    assert body["failed_leg"] == 3
    assert "leg 3" in body["error"]
    assert "110007" in body["error"]
    assert len(await _orders(sim, trader)) == 3  # legs 0-2, nothing after leg 3
    trades = await _trades(sessions, position_id)
    assert [t.leg for t in trades] == [0, 1, 2]
    assert body["components"] == []  # the snapshot is written only on success
    # What the user holds from the failed basket, exactly: legs 0-2, nothing reversed.
    assert {(e["symbol"], e["side"], Decimal(e["quantity"])) for e in body["exposure"]} == {
        (t.symbol, "Buy", t.quantity) for t in trades
    }


@pytest.mark.asyncio
async def test_transient_faults_recover_on_the_configured_schedule(
    api: httpx.AsyncClient,
    trader: ApiUser,
    sim: httpx.AsyncClient,
    worker: ServiceProcess,
) -> None:
    # A 502 on the first order: outcome unknown, looked up, absent, retried after 0.2 s.
    await _fault(sim, trader, kind="http_status", status=502, times=1)
    # Then two busy answers on the ticker reads (tenacity absorbs them inside the run).
    await _fault(
        sim,
        trader,
        path="/v5/order/realtime",
        kind="retcode",
        retCode=10016,
        retMsg="Request timeout",
        times=1,
        skip=1,
    )
    position_id = await _open(api, trader, BLUECHIP)
    body = await _final(api, trader, position_id)
    assert body["status"] == "ACTIVE", body["error"]
    assert body["attempts"] == 2
    _assert_one_order_per_leg(await _orders(sim, trader), 2)
    retries = [
        e
        for e in _events(worker)
        if e.get("position_id") == position_id and e["event"] == "leg.retry_scheduled"
    ]
    assert [r["retry_in_s"] for r in retries] == [0.2]


@pytest.mark.asyncio
async def test_retries_exhausted_fail_the_position(
    api: httpx.AsyncClient,
    trader: ApiUser,
    sim: httpx.AsyncClient,
    worker: ServiceProcess,
) -> None:
    await _fault(sim, trader, kind="http_status", status=503, times=None)
    position_id = await _open(api, trader, BLUECHIP)
    body = await _final(api, trader, position_id)
    assert body["status"] == "FAILED"
    assert body["attempts"] == 4  # the first run and TRADE_RETRY_DELAYS' three retries
    assert body["error"].startswith("gave up after 4 attempts")
    assert await _orders(sim, trader) == []
    retries = [
        e["retry_in_s"]
        for e in _events(worker)
        if e.get("position_id") == position_id and e["event"] == "leg.retry_scheduled"
    ]
    assert retries == [0.2, 0.4, 0.6]


@pytest.mark.asyncio
async def test_a_lost_reply_is_looked_up_not_placed_again(
    api: httpx.AsyncClient,
    trader: ApiUser,
    sim: httpx.AsyncClient,
    worker: ServiceProcess,
) -> None:
    await _fault(sim, trader, kind="drop_after_fill", times=1)
    position_id = await _open(api, trader, BLUECHIP)
    body = await _final(api, trader, position_id)
    assert body["status"] == "ACTIVE"
    _assert_one_order_per_leg(await _orders(sim, trader), 2)
    assert len(body["trades"]) == 2


@pytest.mark.asyncio
async def test_duplicate_enqueues_place_one_set_of_orders(
    api: httpx.AsyncClient,
    trader: ApiUser,
    sim: httpx.AsyncClient,
    worker: ServiceProcess,
) -> None:
    position_id = await _open(api, trader, TOP10)
    await send_copies(position_id, TEST_ENV["CELERY_QUEUE"], 10)
    body = await _final(api, trader, position_id)
    assert body["status"] == "ACTIVE"
    # Let every duplicate run its course before counting.
    await eventually(
        lambda: _discarded(worker, position_id, 10), timeout=30, message="duplicates discarded"
    )
    _assert_one_order_per_leg(await _orders(sim, trader), 10)


async def _discarded(worker: ServiceProcess, position_id: str, count: int) -> bool:
    events = _events(worker)
    return (
        sum(
            1
            for e in events
            if e.get("position_id") == position_id and e["event"] == "position.discarded"
        )
        >= count
    )


@pytest.mark.asyncio
async def test_a_worker_killed_mid_run_is_recovered_without_a_duplicate(
    api: httpx.AsyncClient,
    trader: ApiUser,
    sim: httpx.AsyncClient,
    service_env: dict[str, str],
    tmp_path: Path,
    beat: ServiceProcess,
    sessions: Any,
) -> None:
    # Leg 4's order is held 2 s by the exchange: the worker is killed while it waits, and the
    # exchange then carries the order out (accepted, never recorded by the dead worker).
    await _fault(sim, trader, kind="delay", delay_ms=2000, skip=4, times=1)
    first = start_worker(service_env, tmp_path)
    position_id = await _open(api, trader, TOP10)

    async def leg_four_sent() -> bool:
        return any(
            e["event"] == "leg.submitted" and e.get("leg") == 4
            for e in _events(first)
            if e.get("position_id") == position_id
        )

    await eventually(leg_four_sent, timeout=30, message="leg 4 sent")
    first.kill()
    mid = (await api.get(f"/api/positions/{position_id}", headers=trader.headers)).json()
    assert mid["status"] == "EXECUTING"

    second = start_worker(service_env, tmp_path)
    try:
        body = await _final(api, trader, position_id)
    finally:
        second.stop()
    assert body["status"] == "ACTIVE", body["error"]
    _assert_one_order_per_leg(await _orders(sim, trader), 10)
    assert len(await _trades(sessions, position_id)) == 10
    resumed = [e for e in _events(second) if e.get("position_id") == position_id]
    # Leg 4 was not sent again: found by its orderLinkId, or, when the resumed run looked
    # before the held order had landed, refused by the exchange as a duplicate orderLinkId
    # and read back (the one-order-per-leg check above is what matters).
    assert any(
        e["event"] in ("leg.found_existing", "leg.duplicate_order_link_id") and e.get("leg") == 4
        for e in resumed
    )
    async with sessions() as session:
        snapshot = (
            (
                await session.execute(
                    select(PositionComponent).where(
                        PositionComponent.position_id == uuid.UUID(position_id)
                    )
                )
            )
            .scalars()
            .all()
        )
    assert len(snapshot) == 10


@pytest.mark.asyncio
async def test_one_worker_process_runs_many_positions_on_one_loop(
    api: httpx.AsyncClient,
    trader: ApiUser,
    sim: httpx.AsyncClient,
    service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """Many tasks in one pool process: the loop, the pooled connections and the HTTP session
    are reused, and no "attached to a different loop" or "Event loop is closed" appears."""
    worker = start_worker(service_env, tmp_path, "--concurrency", "1")
    try:
        ids = [await _open(api, trader, BLUECHIP) for _ in range(60)]
        for position_id in ids:
            assert (await _final(api, trader, position_id))["status"] == "ACTIVE"
    finally:
        worker.stop()
    _assert_one_order_per_leg(await _orders(sim, trader), 120)
    text = worker.output()
    assert "attached to a different loop" not in text
    assert "Event loop is closed" not in text
    assert '"level": "error"' not in text


@pytest.mark.asyncio
async def test_an_underfunded_account_fails_in_preflight_with_no_order(
    api: httpx.AsyncClient,
    trader: ApiUser,
    sim: httpx.AsyncClient,
    worker: ServiceProcess,
) -> None:
    # Enough for the basket's notional (1,910 USDT), not for the 1 % margin on top (1,929.10).
    await sim.post(
        "/sim/accounts",
        json={"api_key": trader.api_key, "api_secret": trader.api_secret, "balance": "1920"},
    )
    position_id = await _open(api, trader, BLUECHIP)
    body = await _final(api, trader, position_id)
    assert body["status"] == "FAILED"
    assert body["error"].startswith("pre-flight: available balance 1920 USDT")
    assert await _orders(sim, trader) == []
    events = [e for e in _events(worker) if e.get("position_id") == position_id]
    assert [e["event"] for e in events if e["event"].startswith("preflight.")] == [
        "preflight.failed"
    ]


@pytest.mark.asyncio
async def test_a_halted_symbol_fails_in_preflight(
    api: httpx.AsyncClient,
    trader: ApiUser,
    sim: httpx.AsyncClient,
    service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    # One pool process, which has the filters cached from a first position: the halt is seen
    # only because pre-flight reads them fresh.
    worker = start_worker(service_env, tmp_path, "--concurrency", "1")
    try:
        first = await _open(api, trader, BLUECHIP)
        assert (await _final(api, trader, first))["status"] == "ACTIVE"
        placed = len(await _orders(sim, trader))
        # Accepted on the API's snapshot, halted before the worker gets to it.
        await sim.put("/sim/instruments/ETHUSDT", json={"status": "Closed"})
        try:
            position_id = await _open(api, trader, BLUECHIP)
            body = await _final(api, trader, position_id)
        finally:
            await sim.put("/sim/instruments/ETHUSDT", json={"status": "Trading"})
    finally:
        worker.stop()
    assert body["status"] == "FAILED"
    # Seen in planning (when the market snapshot was refreshed after the halt) or in
    # pre-flight's fresh read: either way before the first order.
    assert body["error"].startswith(("pre-flight: leg 1", "cannot plan the basket")), body["error"]
    assert "ETHUSDT is not trading (status Closed)" in body["error"]
    assert len(await _orders(sim, trader)) == placed  # not even leg 0 was sent
    assert body["exposure"] == []


@pytest.mark.asyncio
async def test_a_stopping_worker_finishes_its_position_first(
    api: httpx.AsyncClient,
    trader: ApiUser,
    sim: httpx.AsyncClient,
    service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    await _fault(sim, trader, kind="delay", delay_ms=1500, skip=1, times=1)
    worker = start_worker(service_env, tmp_path)
    position_id = await _open(api, trader, BLUECHIP)

    async def second_leg_sent() -> bool:
        return any(
            e["event"] == "leg.submitted" and e.get("leg") == 1
            for e in _events(worker)
            if e.get("position_id") == position_id
        )

    await eventually(second_leg_sent, timeout=30, message="leg 1 sent")
    # Asked to stop mid-position: Celery's warm shutdown lets the run finish, then exits.
    assert worker.terminate_main() == 0
    body = (await api.get(f"/api/positions/{position_id}", headers=trader.headers)).json()
    worker.stop()
    assert body["status"] == "ACTIVE"
    _assert_one_order_per_leg(await _orders(sim, trader), 2)


# A key without the read permission: refused on every call to that endpoint.
PERMISSION_DENIED: dict[str, Any] = {
    "kind": "retcode",
    "retCode": 10005,
    "retMsg": "Permission denied, please check your API key permissions.",
    "times": None,
}
# Every kind of leg error, each failing leg `leg` for good: the simulator's knobs, its faults
# on the trader's account, the worker's settings, and the retCode the event must carry.
LEG_ERRORS: dict[str, dict[str, Any]] = {
    "order refused": {
        "faults": [{"kind": "retcode", "retCode": 110007, "retMsg": "ab not enough", "skip": 1}],
        "leg": 1,
        "retcode": 110007,
    },
    "lookup failed": {
        "faults": [{"path": "/v5/order/realtime", **PERMISSION_DENIED}],
        "leg": 0,
        "retcode": 10005,
    },
    "executions unreadable": {
        # No avgPrice in the order's answer: the fill is priced from its executions.
        "config": {"avg_price_blank": True},
        "faults": [{"path": "/v5/execution/list", **PERMISSION_DENIED}],
        "leg": 0,
        "retcode": 10005,
    },
    "fill timeout": {
        # The order stays New past the run's wait on every attempt: the last one fails it.
        "config": {"fill_delay_ms": 60_000},
        "env": {"ORDER_FILL_TIMEOUT_SECONDS": "0.3"},
        "leg": 0,
        "retcode": None,
    },
}


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", list(LEG_ERRORS))
async def test_every_failed_leg_is_reported_once_with_the_same_fields(
    kind: str,
    api: httpx.AsyncClient,
    trader: ApiUser,
    sim: httpx.AsyncClient,
    service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    case = LEG_ERRORS[kind]
    for fault in case.get("faults", []):
        await _fault(sim, trader, **fault)
    await sim.put("/sim/config", json=case.get("config", {}))
    worker = start_worker({**service_env, **case.get("env", {})}, tmp_path)
    try:
        position_id = await _open(api, trader, BLUECHIP)
        body = await _final(api, trader, position_id)
    finally:
        worker.stop()
        await sim.put("/sim/config", json={"avg_price_blank": False, "fill_delay_ms": 0})
    assert body["status"] == "FAILED"
    assert body["failed_leg"] == case["leg"]
    events = [e for e in _events(worker) if e.get("position_id") == position_id]
    failed = [e for e in events if e["event"] == "leg.failed"]
    assert len(failed) == 1, failed
    event = failed[0]
    leg = body["legs"][case["leg"]]
    assert event["level"] == "error"
    assert {k: event[k] for k in ("leg", "symbol", "side", "retcode")} == {
        "leg": case["leg"],
        "symbol": leg["symbol"],
        "side": leg["side"],
        "retcode": case["retcode"],
    }
    assert Decimal(event["qty"]) == Decimal(leg["planned_quantity"])
    assert event["order_link_id"] == f"{uuid.UUID(position_id).hex}-{case['leg']}"
    assert event["error"] in body["error"]
    for field in ("position_id", "attempt", "timestamp", "bybit_order_id", "error"):
        assert field in event, (field, event)
