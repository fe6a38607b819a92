"""Closing a position, end to end: the API over HTTP, a real worker process, PostgreSQL, Redis
and the simulator (which tracks each account's positions and applies reduce-only as Bybit
does). What must hold: each leg closed by one reduce-only order of the opposite side for what
this position holds, never more; every leg tried; duplicates place nothing twice; and the
value the position shows matches the arithmetic done here by hand."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from service.queue import CLOSE_POSITION_TASK, RedisTaskPublisher
from tests.conftest import TEST_ENV
from tests.integration.conftest import refresh_market
from tests.support import ApiUser, ServiceProcess, eventually

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

CENT = Decimal("1E-8")


@pytest_asyncio.fixture
async def client(api_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The API of a separate process (the worker's, too, is one)."""
    async with httpx.AsyncClient(base_url=api_url, timeout=10) as api:
        yield api


async def _store_key(client: httpx.AsyncClient, user: ApiUser) -> None:
    stored = await client.put(
        "/api/credentials",
        json={"api_key": user.api_key, "api_secret": user.api_secret},
        headers=user.headers,
    )
    assert stored.status_code == 200, stored.text


async def _open(
    client: httpx.AsyncClient, user: ApiUser, index: str = "BLUECHIP", size: str = "2000"
) -> dict[str, Any]:
    created = await client.post(
        "/api/positions",
        json={"index": index, "size": size, "direction": "long"},
        headers=user.headers,
    )
    assert created.status_code == 202, created.text
    return dict(created.json())


async def _until(
    client: httpx.AsyncClient, user: ApiUser, position_id: str, statuses: tuple[str, ...]
) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        body = dict(
            (await client.get(f"/api/positions/{position_id}", headers=user.headers)).json()
        )
        return body if body["status"] in statuses else None

    return await eventually(reached, timeout=60, message=f"one of {statuses}")


async def _close(
    client: httpx.AsyncClient, user: ApiUser, position_id: str, key: str | None = None
) -> httpx.Response:
    headers = dict(user.headers)
    if key is not None:
        headers["Idempotency-Key"] = key
    return await client.post(f"/api/positions/{position_id}/close", headers=headers)


async def _orders(sim: httpx.AsyncClient, user: ApiUser) -> list[dict[str, Any]]:
    return list((await sim.get("/sim/orders", params={"api_key": user.api_key})).json()["orders"])


async def _held(sim: httpx.AsyncClient, user: ApiUser) -> dict[str, Decimal]:
    """The account's positions on the exchange, signed (short < 0)."""
    rows = (await sim.get(f"/sim/accounts/{user.api_key}/positions")).json()["positions"]
    return {
        r["symbol"]: Decimal(r["size"]) * (1 if r["side"] == "Buy" else -1)
        for r in rows
        if Decimal(r["size"])
    }


def _json_line(line: str) -> dict[str, Any] | None:
    try:
        parsed = json.loads(line)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _filled(body: dict[str, Any]) -> dict[str, Decimal]:
    return {leg["symbol"]: Decimal(leg["filled_quantity"]) for leg in body["legs"]}


async def _fault(sim: httpx.AsyncClient, user: ApiUser, **fault: Any) -> None:
    response = await sim.post(
        "/sim/faults", json={"path": "/v5/order/create", "api_key": user.api_key, **fault}
    )
    response.raise_for_status()


async def _active(
    client: httpx.AsyncClient, user: ApiUser, index: str = "BLUECHIP", size: str = "2000"
) -> dict[str, Any]:
    """A basket of `user` (its key stored first) opened and ACTIVE."""
    await _store_key(client, user)
    opened = await _open(client, user, index=index, size=size)
    active = await _until(client, user, opened["id"], ("ACTIVE", "FAILED"))
    assert active["status"] == "ACTIVE", active
    return active


async def test_open_then_close_leaves_the_exchange_flat_and_says_closed(
    client: httpx.AsyncClient, worker: ServiceProcess, funded_user: ApiUser, sim: httpx.AsyncClient
) -> None:
    user = funded_user
    await _store_key(client, user)
    opened = await _open(client, user)
    pid = opened["id"]
    early = await _close(client, user, pid)
    assert early.status_code == 409, early.text
    assert "still opening" in early.json()["detail"]
    active = await _until(client, user, pid, ("ACTIVE", "FAILED"))
    assert active["status"] == "ACTIVE", active
    filled = _filled(active)
    assert await _held(sim, user) == filled

    closing = await _close(client, user, pid, key="close-1")
    assert closing.status_code == 202, closing.text
    assert closing.json()["status"] == "CLOSING"
    assert closing.headers["Location"] == f"/api/positions/{pid}"
    again = await _close(client, user, pid, key="close-1")
    assert again.status_code == 202
    assert again.headers.get("Idempotent-Replayed") == "true"
    closed = await _until(client, user, pid, ("CLOSED", "CLOSE_FAILED"))
    after = await _close(client, user, pid)
    assert after.status_code == 409
    assert "already closed" in after.json()["detail"]

    assert closed["status"] == "CLOSED", closed
    assert closed["close_error"] is None
    assert closed["close_round"] == 1
    assert await _held(sim, user) == {}
    orders = await _orders(sim, user)
    closes = [o for o in orders if o["reduceOnly"]]
    # One reduce-only order per leg, opposite side, for exactly what filled.
    assert sorted((o["symbol"], o["side"], Decimal(o["qty"])) for o in closes) == sorted(
        (symbol, "Sell", qty) for symbol, qty in filled.items()
    )
    assert len({o["orderLinkId"] for o in orders}) == len(orders) == 2 * len(filled)
    assert all(len(o["orderLinkId"]) <= 36 for o in orders)
    phases = [t["phase"] for t in closed["trades"]]
    assert phases.count("close") == len(filled)
    assert phases.count("open") == len(filled)
    for leg in closed["legs"]:
        assert Decimal(leg["held_quantity"]) == 0
        assert Decimal(leg["closed_quantity"]) == Decimal(leg["filled_quantity"])
        assert leg["average_exit_price"] is not None
    assert closed["exposure"] == []
    assert closed["value"]["unrealised_pnl"] is not None
    assert Decimal(closed["value"]["unrealised_pnl"]) == 0


async def test_closing_one_of_two_baskets_on_the_same_symbols_keeps_the_other_s_quantity(
    client: httpx.AsyncClient, worker: ServiceProcess, funded_user: ApiUser, sim: httpx.AsyncClient
) -> None:
    user = funded_user
    await _store_key(client, user)
    first = await _open(client, user, size="2000")
    second = await _open(client, user, size="3000")
    one = await _until(client, user, first["id"], ("ACTIVE", "FAILED"))
    two = await _until(client, user, second["id"], ("ACTIVE", "FAILED"))
    assert one["status"] == two["status"] == "ACTIVE"
    kept = _filled(two)
    both = {s: q + kept[s] for s, q in _filled(one).items()}
    assert await _held(sim, user) == both
    assert (await _close(client, user, first["id"])).status_code == 202
    closed = await _until(client, user, first["id"], ("CLOSED", "CLOSE_FAILED"))
    still = await _until(client, user, second["id"], ("ACTIVE",))
    assert closed["status"] == "CLOSED", closed
    assert await _held(sim, user) == kept
    assert {e["symbol"]: Decimal(e["quantity"]) for e in still["exposure"]} == kept


async def test_a_failed_basket_closes_only_what_filled(
    client: httpx.AsyncClient, worker: ServiceProcess, funded_user: ApiUser, sim: httpx.AsyncClient
) -> None:
    user = funded_user
    await _store_key(client, user)
    # TOP10's third order is refused for good: two legs filled, the basket FAILED.
    await _fault(sim, user, kind="retcode", retCode=110007, skip=2, times=1)
    opened = await _open(client, user, index="TOP10", size="5000")
    failed = await _until(client, user, opened["id"], ("ACTIVE", "FAILED"))
    assert failed["status"] == "FAILED", failed
    held = {s: q for s, q in _filled(failed).items() if q}
    assert len(held) == 2
    assert await _held(sim, user) == held
    assert (await _close(client, user, opened["id"])).status_code == 202
    closed = await _until(client, user, opened["id"], ("CLOSED", "CLOSE_FAILED"))
    assert closed["status"] == "CLOSED", closed
    assert closed["error"] == failed["error"]  # the opening's reason stays
    assert await _held(sim, user) == {}
    closes = [o for o in await _orders(sim, user) if o["reduceOnly"]]
    assert sorted((o["symbol"], Decimal(o["qty"])) for o in closes) == sorted(held.items())


async def test_a_failed_basket_with_nothing_filled_cannot_be_closed(
    client: httpx.AsyncClient, worker: ServiceProcess, funded_user: ApiUser, sim: httpx.AsyncClient
) -> None:
    user = funded_user
    await _store_key(client, user)
    await _fault(sim, user, kind="retcode", retCode=110007, times=1)
    opened = await _open(client, user)
    failed = await _until(client, user, opened["id"], ("ACTIVE", "FAILED"))
    assert failed["status"] == "FAILED"
    refused = await _close(client, user, opened["id"])
    other = await client.post(f"/api/positions/{uuid.uuid4()}/close", headers=user.headers)
    assert refused.status_code == 409
    assert "nothing filled" in refused.json()["detail"]
    assert other.status_code == 404


async def test_a_transient_close_error_is_retried_and_a_lost_reply_is_looked_up(
    client: httpx.AsyncClient, worker: ServiceProcess, funded_user: ApiUser, sim: httpx.AsyncClient
) -> None:
    user = funded_user
    active = await _active(client, user)
    opened = active
    # The first close order gets a 502 (nothing placed); the second lands and its reply
    # is lost.
    await _fault(sim, user, kind="http_status", status=502, times=1)
    await _fault(sim, user, kind="drop_after_fill", skip=1, times=1)
    assert (await _close(client, user, opened["id"])).status_code == 202
    closed = await _until(client, user, opened["id"], ("CLOSED", "CLOSE_FAILED"))
    assert closed["status"] == "CLOSED", closed
    assert closed["attempts"] >= 2  # the 502 was retried
    assert await _held(sim, user) == {}
    closes = [o for o in await _orders(sim, user) if o["reduceOnly"]]
    assert len(closes) == len(active["legs"])  # nothing placed twice
    events = [_json_line(line) for line in worker.output().splitlines()]
    submitted = [e for e in events if e and e.get("event") == "leg.submitted"]
    assert {e.get("phase") for e in submitted} == {"open", "close"}
    assert any(
        e.get("event") == "leg.retry_scheduled" and e.get("phase") == "close" for e in events if e
    )


async def test_a_permanent_error_on_one_leg_closes_the_others_and_can_be_closed_again(
    client: httpx.AsyncClient, worker: ServiceProcess, funded_user: ApiUser, sim: httpx.AsyncClient
) -> None:
    user = funded_user
    active = await _active(client, user, index="TOP10", size="5000")
    pid = active["id"]
    filled = _filled(active)
    # The close's first order (leg 0, BTCUSDT) is refused for good.
    await _fault(sim, user, kind="retcode", retCode=10001, retMsg="params error", times=1)
    assert (await _close(client, user, pid)).status_code == 202
    failed = await _until(client, user, pid, ("CLOSED", "CLOSE_FAILED"))
    assert failed["status"] == "CLOSE_FAILED", failed
    held = await _held(sim, user)
    assert held == {"BTCUSDT": filled["BTCUSDT"]}  # every other leg was closed
    assert "BTCUSDT still held" in failed["close_error"]
    btc = next(leg for leg in failed["legs"] if leg["symbol"] == "BTCUSDT")
    assert Decimal(btc["held_quantity"]) == filled["BTCUSDT"]
    assert btc["close_error"] is not None
    assert [e["symbol"] for e in failed["exposure"]] == ["BTCUSDT"]

    again = await _close(client, user, pid)
    assert again.status_code == 202
    closed = await _until(client, user, pid, ("CLOSED", "CLOSE_FAILED"))
    assert closed["status"] == "CLOSED", closed
    assert closed["close_round"] == 2
    assert await _held(sim, user) == {}
    closes = [o for o in await _orders(sim, user) if o["reduceOnly"]]
    # Round 1: nine legs; round 2: only what was still held, with an orderLinkId of its own.
    assert len(closes) == len(filled)
    assert [o["symbol"] for o in closes].count("BTCUSDT") == 1
    assert "-c2-" in next(o["orderLinkId"] for o in closes if o["symbol"] == "BTCUSDT")


async def test_duplicate_close_requests_and_deliveries_place_one_set_of_orders(
    client: httpx.AsyncClient, worker: ServiceProcess, funded_user: ApiUser, sim: httpx.AsyncClient
) -> None:
    user = funded_user
    redis = aioredis.from_url(TEST_ENV["REDIS_URL"])
    publisher = RedisTaskPublisher(redis, queue=TEST_ENV["CELERY_QUEUE"])
    try:
        active = await _active(client, user, index="TOP10", size="5000")
        pid = active["id"]
        answers = await asyncio.gather(
            *(_close(client, user, pid, key="same") for _ in range(4)),
            *(_close(client, user, pid) for _ in range(4)),
        )
        # Duplicate deliveries of the close task, and stray copies with other ids.
        for _ in range(3):
            await publisher.publish(uuid.UUID(pid), task=CLOSE_POSITION_TASK)
        closed = await _until(client, user, pid, ("CLOSED", "CLOSE_FAILED"))
    finally:
        await redis.aclose()
    codes = sorted(a.status_code for a in answers)
    assert codes.count(202) >= 1
    assert set(codes) <= {202, 409}
    started = [
        a for a in answers if a.status_code == 202 and "Idempotent-Replayed" not in a.headers
    ]
    assert len(started) == 1
    assert closed["status"] == "CLOSED"
    assert closed["close_round"] == 1
    closes = [o for o in await _orders(sim, user) if o["reduceOnly"]]
    assert len(closes) == len(active["legs"])
    assert len({o["orderLinkId"] for o in closes}) == len(closes)
    assert await _held(sim, user) == {}


async def test_value_and_pnl_follow_the_mark_price_and_the_exit(
    client: httpx.AsyncClient,
    worker: ServiceProcess,
    funded_user: ApiUser,
    sim: httpx.AsyncClient,
    sessions: object,
    simulator_url: str,
) -> None:
    user = funded_user
    active = await _active(client, user)
    pid = active["id"]
    btc_trades = [t for t in active["trades"] if t["symbol"] == "BTCUSDT"]
    qty = sum((Decimal(t["quantity"]) for t in btc_trades), Decimal(0))
    cost = sum((Decimal(t["quantity"]) * Decimal(t["price"]) for t in btc_trades), Decimal(0))
    entry = cost / qty
    leg = next(leg for leg in active["legs"] if leg["symbol"] == "BTCUSDT")
    reference = Decimal(leg["reference_price"])
    assert Decimal(leg["average_entry_price"]) == entry.quantize(CENT)
    # A long leg bought above its reference: positive slippage is worse for the user.
    slippage = ((entry - reference) / reference * 10000).quantize(Decimal("0.01"))
    assert Decimal(leg["slippage_bps"]) == slippage
    assert Decimal(leg["target_weight"]) == Decimal("0.6")

    mark = (entry * Decimal("1.05")).quantize(Decimal("0.1"))
    moved = await sim.put("/sim/tickers/BTCUSDT", json={"markPrice": str(mark)})
    moved.raise_for_status()
    await refresh_market(sessions, simulator_url)

    async def revalued() -> dict[str, Any] | None:
        body = dict((await client.get(f"/api/positions/{pid}", headers=user.headers)).json())
        btc = next(leg for leg in body["legs"] if leg["symbol"] == "BTCUSDT")
        shown = btc["mark_price"]
        return body if shown is not None and Decimal(shown) == mark else None

    marked = await eventually(revalued, timeout=15, message="the moved mark price shown")
    btc = next(leg for leg in marked["legs"] if leg["symbol"] == "BTCUSDT")
    assert Decimal(btc["unrealised_pnl"]) == (qty * mark - cost).quantize(CENT)
    assert Decimal(btc["current_value"]) == (qty * mark).quantize(CENT)
    assert btc["mark_price_at"] is not None

    exit_price = (entry * Decimal("1.02")).quantize(Decimal("0.1"))
    (await sim.put("/sim/tickers/BTCUSDT", json={"lastPrice": str(exit_price)})).raise_for_status()
    assert (await _close(client, user, pid)).status_code == 202
    closed = await _until(client, user, pid, ("CLOSED", "CLOSE_FAILED"))
    assert closed["status"] == "CLOSED", closed
    exits = [t for t in closed["trades"] if t["symbol"] == "BTCUSDT" and t["phase"] == "close"]
    proceeds = sum((Decimal(t["quantity"]) * Decimal(t["price"]) for t in exits), Decimal(0))
    btc = next(leg for leg in closed["legs"] if leg["symbol"] == "BTCUSDT")
    assert Decimal(btc["realised_pnl"]) == (proceeds - cost).quantize(CENT)
    fees = sum((Decimal(t["fee"]) for t in closed["trades"] if t["fee"]), Decimal(0))
    assert Decimal(closed["value"]["fees"]) == fees.quantize(CENT)
    realised = sum((Decimal(leg["realised_pnl"]) for leg in closed["legs"]), Decimal(0))
    assert abs(Decimal(closed["value"]["realised_pnl"]) - realised) <= CENT * len(closed["legs"])
    assert Decimal(closed["value"]["net_pnl"]) == (
        Decimal(closed["value"]["realised_pnl"]) - Decimal(closed["value"]["fees"])
    )


async def test_a_new_round_never_sells_what_an_earlier_round_sold(
    client: httpx.AsyncClient, worker: ServiceProcess, funded_user: ApiUser, sim: httpx.AsyncClient
) -> None:
    """Round 1's orders land but no lookup ever answers: it ends CLOSE_FAILED with their
    fills unrecorded. Round 2 looks them up before it plans, and sells nothing more, so the
    other basket's quantity on the same symbols stays."""
    user = funded_user
    first = await _active(client, user, size="2000")
    second = await _open(client, user, size="3000")
    kept = _filled(await _until(client, user, second["id"], ("ACTIVE",)))
    lookups = {"path": "/v5/order/realtime", "api_key": user.api_key}
    await sim.post(
        "/sim/faults", json={**lookups, "kind": "http_status", "status": 502, "times": None}
    )
    assert (await _close(client, user, first["id"])).status_code == 202
    unseen = await _until(client, user, first["id"], ("CLOSED", "CLOSE_FAILED"))
    assert unseen["status"] == "CLOSE_FAILED", unseen
    assert await _held(sim, user) == kept  # the orders did land
    (await sim.delete("/sim/faults")).raise_for_status()
    assert (await _close(client, user, first["id"])).status_code == 202
    closed = await _until(client, user, first["id"], ("CLOSED", "CLOSE_FAILED"))
    assert closed["status"] == "CLOSED", closed
    assert await _held(sim, user) == kept
    closes = [o for o in await _orders(sim, user) if o["reduceOnly"]]
    assert len(closes) == len(first["legs"])  # round 2 sent nothing
    assert all(Decimal(leg["held_quantity"]) == 0 for leg in closed["legs"])


async def test_a_leg_reduced_outside_the_service_is_closed_elsewhere_not_failed(
    client: httpx.AsyncClient, worker: ServiceProcess, funded_user: ApiUser, sim: httpx.AsyncClient
) -> None:
    user = funded_user
    active = await _active(client, user)
    btc = _filled(active)["BTCUSDT"]
    # The user trims BTC on Bybit's own site (or a liquidation, ADL, did).
    trimmed = await sim.post(
        "/sim/positions",
        json={"api_key": user.api_key, "symbol": "BTCUSDT", "side": "Buy", "size": "0.002"},
    )
    trimmed.raise_for_status()
    assert (await _close(client, user, active["id"])).status_code == 202
    closed = await _until(client, user, active["id"], ("CLOSED", "CLOSE_FAILED"))
    assert closed["status"] == "CLOSED", closed
    assert await _held(sim, user) == {}
    leg = next(leg for leg in closed["legs"] if leg["symbol"] == "BTCUSDT")
    assert Decimal(leg["closed_quantity"]) == Decimal("0.002")
    assert Decimal(leg["closed_elsewhere_quantity"]) == btc - Decimal("0.002")
    assert Decimal(leg["held_quantity"]) == 0
    assert closed["exposure"] == []
    events = [_json_line(line) for line in worker.output().splitlines()]
    assert any(e and e.get("event") == "leg.closed_elsewhere" for e in events)


async def test_a_failed_basket_s_unseen_fill_is_found_and_closed(
    client: httpx.AsyncClient, worker: ServiceProcess, funded_user: ApiUser, sim: httpx.AsyncClient
) -> None:
    """The opening's second order lands but its outcome is never read: the basket FAILED
    with that fill unrecorded. The close looks it up first and closes it too."""
    user = funded_user
    await _store_key(client, user)
    await _fault(sim, user, kind="delay", skip=1, times=1, delay_ms=3000)
    opened = await _open(client, user)

    async def first_leg_recorded() -> bool:
        body = (await client.get(f"/api/positions/{opened['id']}", headers=user.headers)).json()
        return len(body["trades"]) == 1

    await eventually(first_leg_recorded, timeout=20, message="leg 0 recorded")
    lookups = {"path": "/v5/order/realtime", "api_key": user.api_key}
    await sim.post(
        "/sim/faults", json={**lookups, "kind": "http_status", "status": 502, "times": None}
    )
    failed = await _until(client, user, opened["id"], ("ACTIVE", "FAILED"))
    (await sim.delete("/sim/faults")).raise_for_status()
    assert failed["status"] == "FAILED", failed
    assert len(await _held(sim, user)) == 2  # both legs are on the exchange
    assert (await _close(client, user, opened["id"])).status_code == 202
    closed = await _until(client, user, opened["id"], ("CLOSED", "CLOSE_FAILED"))
    assert closed["status"] == "CLOSED", closed
    assert await _held(sim, user) == {}
    assert len([t for t in closed["trades"] if t["phase"] == "open"]) == 2


async def test_a_close_with_a_key_of_another_account_sends_nothing(
    client: httpx.AsyncClient, worker: ServiceProcess, funded_user: ApiUser, sim: httpx.AsyncClient
) -> None:
    user = funded_user
    other = ApiUser(
        email=user.email,
        token=user.token,
        api_key=f"TK{secrets.token_hex(8).upper()}",
        api_secret=secrets.token_hex(16),
    )
    active = await _active(client, user)
    # The user now stores a key of another Bybit account, which holds BTC of its own.
    await sim.post(
        "/sim/accounts",
        json={"api_key": other.api_key, "api_secret": other.api_secret, "balance": "1000000"},
    )
    await sim.post(
        "/sim/positions",
        json={"api_key": other.api_key, "symbol": "BTCUSDT", "side": "Buy", "size": "0.5"},
    )
    await _store_key(client, other)
    assert (await _close(client, user, active["id"])).status_code == 202
    refused = await _until(client, user, active["id"], ("CLOSED", "CLOSE_FAILED"))
    assert refused["status"] == "CLOSE_FAILED", refused
    assert "another account" not in refused["close_error"]
    assert "was opened on account" in refused["close_error"]
    assert await _held(sim, other) == {"BTCUSDT": Decimal("0.5")}
    assert await _held(sim, user) == _filled(active)
    await _store_key(client, user)  # the right key again
    assert (await _close(client, user, active["id"])).status_code == 202
    closed = await _until(client, user, active["id"], ("CLOSED", "CLOSE_FAILED"))
    assert closed["status"] == "CLOSED", closed
    assert await _held(sim, user) == {}


async def test_what_a_round_found_closed_elsewhere_is_not_sold_by_the_next(
    client: httpx.AsyncClient, worker: ServiceProcess, funded_user: ApiUser, sim: httpx.AsyncClient
) -> None:
    """Round 1 finds BTC trimmed on the exchange (closed elsewhere) and fails on ETH; the
    user then opens another basket; round 2 sells only ETH, never the new basket's BTC."""
    user = funded_user
    first = await _active(client, user)
    await sim.post(
        "/sim/positions",
        json={"api_key": user.api_key, "symbol": "BTCUSDT", "side": "Buy", "size": "0.001"},
    )
    # The third order call of the close: BTC (capped), its remainder (refused), then ETH.
    await _fault(sim, user, kind="retcode", retCode=10001, retMsg="params error", skip=2)
    assert (await _close(client, user, first["id"])).status_code == 202
    partly = await _until(client, user, first["id"], ("CLOSED", "CLOSE_FAILED"))
    assert partly["status"] == "CLOSE_FAILED", partly
    (await sim.delete("/sim/faults")).raise_for_status()
    second = await _open(client, user)
    kept = _filled(await _until(client, user, second["id"], ("ACTIVE",)))
    assert (await _close(client, user, first["id"])).status_code == 202
    closed = await _until(client, user, first["id"], ("CLOSED", "CLOSE_FAILED"))
    assert closed["status"] == "CLOSED", closed
    assert await _held(sim, user) == kept
    btc = next(leg for leg in closed["legs"] if leg["symbol"] == "BTCUSDT")
    assert Decimal(btc["closed_quantity"]) + Decimal(btc["closed_elsewhere_quantity"]) == Decimal(
        btc["filled_quantity"]
    )
    second_round = [o for o in await _orders(sim, user) if "-c2-" in o["orderLinkId"]]
    assert [o["symbol"] for o in second_round] == ["ETHUSDT"]


async def test_a_leg_worth_less_than_the_minimum_order_value_still_closes(
    client: httpx.AsyncClient,
    worker: ServiceProcess,
    funded_user: ApiUser,
    sim: httpx.AsyncClient,
    sessions: object,
    simulator_url: str,
) -> None:
    """Closing orders are exempt from the minimum order value (Bybit's trading rules): a
    leg whose price fell far below it is still closed."""
    user = funded_user
    active = await _active(client, user, size="400")
    eth = next(leg for leg in active["legs"] if leg["symbol"] == "ETHUSDT")
    cheap = (Decimal(eth["average_entry_price"]) / 40).quantize(Decimal("0.01"))
    try:
        (await sim.put("/sim/tickers/ETHUSDT", json={"lastPrice": str(cheap)})).raise_for_status()
        await refresh_market(sessions, simulator_url)
        assert (await _close(client, user, active["id"])).status_code == 202
        closed = await _until(client, user, active["id"], ("CLOSED", "CLOSE_FAILED"))
    finally:
        await sim.put("/sim/tickers/ETHUSDT", json={"lastPrice": eth["reference_price"]})
        await refresh_market(sessions, simulator_url)
    assert closed["status"] == "CLOSED", closed
    assert await _held(sim, user) == {}


async def test_an_exchange_without_query_api_still_trades_and_closes(
    client: httpx.AsyncClient,
    worker: ServiceProcess,
    funded_user: ApiUser,
    sim: httpx.AsyncClient,
    sessions: object,
) -> None:
    """Bybit's Demo Trading does not serve /v5/user/query-api: the opening goes on without
    the account's UID (said in the log), and the close without the account check."""
    from sqlalchemy import text

    user = funded_user
    # Stored before (PUT /api/credentials asks query-api itself).
    await _store_key(client, user)
    refused = {"path": "/v5/user/query-api", "api_key": user.api_key, "times": None}
    await sim.post("/sim/faults", json={**refused, "kind": "retcode", "retCode": 10005})
    try:
        opened = await _open(client, user)
        active = await _until(client, user, opened["id"], ("ACTIVE", "FAILED"))
        assert active["status"] == "ACTIVE", active
        assert (await _close(client, user, active["id"])).status_code == 202
        closed = await _until(client, user, active["id"], ("CLOSED", "CLOSE_FAILED"))
    finally:
        await sim.delete("/sim/faults")
    assert closed["status"] == "CLOSED", closed
    async with sessions() as session:  # type: ignore[operator]
        uid = (
            await session.execute(
                text("SELECT exchange_uid FROM synthetic_positions WHERE id = :id"),
                {"id": uuid.UUID(active["id"])},
            )
        ).scalar_one()
    assert uid is None
    events = [_json_line(line) for line in worker.output().splitlines()]
    assert any(e and e.get("event") == "preflight.account_unknown" for e in events)


async def test_the_key_s_account_is_read_once_and_kept_for_every_basket(
    client: httpx.AsyncClient,
    worker: ServiceProcess,
    funded_user: ApiUser,
    sim: httpx.AsyncClient,
    sessions: object,
) -> None:
    """A key's account never changes: the second basket of the key does not ask Bybit for
    it again, and its position records the same account (the close's check needs it)."""
    from sqlalchemy import text

    async def asked() -> int:
        counts = (await sim.get("/sim/requests")).json()["counts"]
        return int(counts.get("/v5/user/query-api", 0))

    first = await _active(client, user=funded_user)
    before = await asked()
    # The key is not stored again (PUT /api/credentials asks query-api itself).
    opened = await _open(client, funded_user)
    second = await _until(client, funded_user, opened["id"], ("ACTIVE", "FAILED"))
    assert second["status"] == "ACTIVE", second
    assert await asked() == before
    async with sessions() as session:  # type: ignore[operator]
        uids = (
            (
                await session.execute(
                    text("SELECT exchange_uid FROM synthetic_positions WHERE id = ANY(:ids)"),
                    {"ids": [uuid.UUID(first["id"]), uuid.UUID(second["id"])]},
                )
            )
            .scalars()
            .all()
        )
    assert len(uids) == 2
    assert uids[0] is not None
    assert uids[0] == uids[1]
