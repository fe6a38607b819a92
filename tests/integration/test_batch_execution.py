"""Batch execution (`"execution": "batch"`) through real worker processes: every first order
in one create-batch request, every fill read at once, exactly once under a refused order, a
lost reply, a worker killed between the batch and the fill reads, and duplicate deliveries.
Asserted on the exchange's own record (the simulator's orders and requests)."""

from __future__ import annotations

import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import func, select

from service.models import Trade
from tests.integration.conftest import start_worker
from tests.integration.run_safety import (
    beat,
    duplicates,
    events,
    fault,
    final,
    orders,
    post,
    send_copies,
)
from tests.reliability.helpers import funded_trader
from tests.support import ApiUser, ServiceProcess, eventually

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

TOP10_BATCH = {"index": "TOP10", "size": "5000", "direction": "long", "execution": "batch"}
BATCH_PATH = "/v5/order/create-batch"


@pytest_asyncio.fixture
async def trader(api: httpx.AsyncClient, sim: httpx.AsyncClient, sessions: Any) -> ApiUser:
    return await funded_trader(sessions, sim, api)


async def _one_basket(
    api: httpx.AsyncClient, user: ApiUser, env: dict[str, str], tmp_path: Path
) -> tuple[ServiceProcess, str, dict[str, Any]]:
    """A batch TOP10 basket of `user`, run by a worker of its own until final (the worker is
    stopped; its log stays readable)."""
    worker = start_worker(env, tmp_path)
    try:
        position_id = await post(api, user, TOP10_BATCH)
        return worker, position_id, await final(api, user, position_id)
    finally:
        worker.stop()


async def _batch_requests(sim: httpx.AsyncClient, user: ApiUser) -> int:
    """create-batch requests the exchange received from the user's key."""
    response = await sim.get("/sim/calls", params={"api_key": user.api_key, "path": BATCH_PATH})
    response.raise_for_status()
    return len({c["arrived_ms"] for c in response.json()["calls"]})


async def _single_orders(sim: httpx.AsyncClient, user: ApiUser) -> int:
    response = await sim.get(
        "/sim/calls", params={"api_key": user.api_key, "path": "/v5/order/create"}
    )
    return len(response.json()["calls"])


async def _trades(sessions: Any, position_id: str) -> int:
    async with sessions() as session:
        return int(
            (
                await session.execute(
                    select(func.count())
                    .select_from(Trade)
                    .where(Trade.position_id == uuid.UUID(position_id))
                )
            ).scalar_one()
        )


async def test_a_batch_basket_sends_every_leg_in_one_request_and_reads_every_fill(
    api: httpx.AsyncClient,
    sim: httpx.AsyncClient,
    trader: ApiUser,
    sessions: Any,
    service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    worker, position_id, body = await _one_basket(api, trader, service_env, tmp_path)
    assert body["status"] == "ACTIVE", body["error"]
    assert body["execution"] == "batch"
    placed = await orders(sim, trader)
    assert (len(placed), duplicates(placed)) == (10, 0)
    assert await _batch_requests(sim, trader) == 1
    assert await _single_orders(sim, trader) == 0
    assert len(body["trades"]) == 10
    assert len(body["components"]) == 10
    assert all(Decimal(leg["filled_quantity"]) > 0 for leg in body["legs"])
    evs = events(worker, position_id)
    submitted = [e for e in evs if e["event"] == "leg.submitted"]
    assert len(submitted) == 10
    assert all(e["batch"] is True for e in submitted)
    filled = [e for e in evs if e["event"] == "leg.filled"]
    assert sorted(e["leg"] for e in filled) == list(range(10))
    # Every fill was read after the one batch, side by side: the reads overlap in time.
    first_filled = min(e["ts"] for e in filled)
    assert all(e["ts"] <= first_filled + 1.0 for e in filled)


async def test_an_order_refused_inside_the_batch_fails_the_basket_and_shows_the_rest(
    api: httpx.AsyncClient,
    sim: httpx.AsyncClient,
    trader: ApiUser,
    service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    # ETHUSDT's order (TOP10's second leg) is refused on its own: the margin is not there.
    await fault(
        sim,
        trader,
        path=BATCH_PATH,
        kind="retcode",
        symbol="ETHUSDT",
        retCode=110007,
        retMsg="ab not enough for new order",
    )
    worker, position_id, body = await _one_basket(api, trader, service_env, tmp_path)
    assert body["status"] == "FAILED"
    eth = next(leg for leg in body["legs"] if leg["symbol"] == "ETHUSDT")
    assert body["failed_leg"] == eth["leg"]
    assert "110007" in body["error"] or "balance" in body["error"].lower(), body["error"]
    assert Decimal(eth["filled_quantity"]) == 0
    # The other nine filled in the same batch: held, shown, nothing reversed.
    placed = await orders(sim, trader)
    assert (len(placed), duplicates(placed)) == (9, 0)
    assert all(o["side"] == "Buy" for o in placed)
    held = [leg for leg in body["legs"] if leg["symbol"] != "ETHUSDT"]
    assert all(Decimal(leg["filled_quantity"]) > 0 for leg in held)
    assert len(body["trades"]) == 9
    failed = [e for e in events(worker, position_id) if e["event"] == "leg.failed"]
    assert [e["symbol"] for e in failed] == ["ETHUSDT"]


async def test_a_batch_whose_reply_is_lost_is_looked_up_not_sent_again(
    api: httpx.AsyncClient,
    sim: httpx.AsyncClient,
    trader: ApiUser,
    service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    # The batch is carried out and recorded by the exchange; the connection then drops.
    await fault(sim, trader, path=BATCH_PATH, kind="drop_after_fill")
    worker, position_id, body = await _one_basket(api, trader, service_env, tmp_path)
    assert body["status"] == "ACTIVE", body["error"]
    placed = await orders(sim, trader)
    assert (len(placed), duplicates(placed)) == (10, 0)
    assert await _batch_requests(sim, trader) == 1  # never sent again
    evs = events(worker, position_id)
    assert sum(e["event"] == "leg.found_existing" for e in evs) == 10
    assert len(body["trades"]) == 10


async def test_a_worker_killed_between_the_batch_and_the_fill_reads_is_resumed_once(
    api: httpx.AsyncClient,
    sim: httpx.AsyncClient,
    trader: ApiUser,
    sessions: Any,
    service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    # The fill reads hang: the worker is killed once the batch has landed, nothing recorded.
    await fault(sim, trader, path="/v5/order/realtime", kind="hang", delay_ms=30000, times=None)
    first = start_worker(service_env, tmp_path)
    try:
        position_id = await post(api, trader, TOP10_BATCH)

        async def batch_landed() -> bool:
            return len(await orders(sim, trader)) == 10

        await eventually(batch_landed, timeout=60, interval=0.02, message="the batch")
    finally:
        first.kill()
    assert await _trades(sessions, position_id) == 0
    await sim.delete("/sim/faults")
    second = start_worker(service_env, tmp_path)
    sweeper = beat(service_env, tmp_path)
    try:
        body = await final(api, trader, position_id)
    finally:
        sweeper.stop()
        second.stop()
    assert body["status"] == "ACTIVE", body["error"]
    placed = await orders(sim, trader)
    assert (len(placed), duplicates(placed)) == (10, 0)
    assert await _batch_requests(sim, trader) == 1
    assert await _trades(sessions, position_id) == 10
    resumed = events(second, position_id)
    assert sum(e["event"] == "leg.found_existing" for e in resumed) == 10


async def test_duplicate_deliveries_of_a_batch_basket_place_one_set_of_orders(
    api: httpx.AsyncClient,
    sim: httpx.AsyncClient,
    trader: ApiUser,
    service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    worker = start_worker(service_env, tmp_path)
    try:
        position_id = await post(api, trader, TOP10_BATCH)
        await send_copies(position_id, service_env["CELERY_QUEUE"], 5)
        body = await final(api, trader, position_id)

        async def all_delivered() -> bool:
            evs = events(worker, position_id)
            return sum(e["event"] == "position.discarded" for e in evs) >= 5

        await eventually(all_delivered, timeout=30, message="the copies discarded")
    finally:
        worker.stop()
    assert body["status"] == "ACTIVE", body["error"]
    placed = await orders(sim, trader)
    assert (len(placed), duplicates(placed)) == (10, 0)
    assert await _batch_requests(sim, trader) == 1


async def test_an_unknown_execution_mode_is_a_clear_422(
    api: httpx.AsyncClient, trader: ApiUser
) -> None:
    response = await api.post(
        "/api/positions", json={**TOP10_BATCH, "execution": "parallel"}, headers=trader.headers
    )
    assert response.status_code == 422
    assert "execution" in response.text
    assert "sequential" in response.text
    assert "batch" in response.text


async def test_a_basket_larger_than_a_batch_goes_in_several_and_stops_at_a_refusal(
    api: httpx.AsyncClient,
    sim: httpx.AsyncClient,
    sessions: Any,
    service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    env = {**service_env, "BATCH_MAX_ORDERS": "4"}
    whole = await funded_trader(sessions, sim, api)
    refused = await funded_trader(sessions, sim, api)
    # ETHUSDT (the second leg, in the first batch of four) is refused for the second account.
    await fault(sim, refused, path=BATCH_PATH, kind="retcode", symbol="ETHUSDT", retCode=110007)
    worker = start_worker(env, tmp_path)
    try:
        complete = await post(api, whole, TOP10_BATCH)
        failing = await post(api, refused, TOP10_BATCH)
        complete_body = await final(api, whole, complete)
        failing_body = await final(api, refused, failing)
    finally:
        worker.stop()
    assert complete_body["status"] == "ACTIVE", complete_body["error"]
    assert await _batch_requests(sim, whole) == 3  # 4 + 4 + 2
    assert len(await orders(sim, whole)) == 10
    # The refusal in the first batch fails the basket: the next batches are never sent, so the
    # user holds only what that first batch filled.
    assert failing_body["status"] == "FAILED"
    assert await _batch_requests(sim, refused) == 1
    assert len(await orders(sim, refused)) == 3


async def test_fills_read_before_the_run_s_deadline_are_recorded_when_it_strikes(
    api: httpx.AsyncClient,
    sim: httpx.AsyncClient,
    trader: ApiUser,
    sessions: Any,
    service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    # Nine of the ten reads answer; the tenth hangs until the run's deadline (0.75 x 8 s)
    # cancels the run: the nine fills it read are recorded all the same (the basket shows
    # what it holds while it waits for its next attempt), and the next attempt finishes it.
    await fault(
        sim, trader, path="/v5/order/realtime", kind="delay", delay_ms=30000, skip=9, times=None
    )
    worker = start_worker({**service_env, "TASK_TIME_LIMIT_SECONDS": "8"}, tmp_path)
    try:
        position_id = await post(api, trader, TOP10_BATCH)

        async def nine_recorded() -> bool:
            return await _trades(sessions, position_id) == 9

        await eventually(nine_recorded, timeout=30, interval=0.05, message="the nine fills")
        await sim.delete("/sim/faults")
        body = await final(api, trader, position_id)
    finally:
        worker.stop()
    assert body["status"] == "ACTIVE", body["error"]
    placed = await orders(sim, trader)
    assert (len(placed), duplicates(placed)) == (10, 0)
    assert await _batch_requests(sim, trader) == 1
    assert await _trades(sessions, position_id) == 10
    assert any(e["event"] == "run.deadline_passed" for e in events(worker, position_id))
