"""Issue 22: the broker is not trusted. A plain Celery client holding only the Redis URL can
neither ping, inspect nor shut a worker down; a market snapshot written into Redis by hand
(fetched in the far future, or with a poisoned price or step) is refused as if absent, so
the API answers its 503 and never a 500, and a good copy in memory keeps serving."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from celery import Celery

from service.bybit.types import Instrument
from service.config import get_settings
from service.credentials.service import store_credentials
from service.market.snapshot import CACHE_KEY, MarketCache, MarketSnapshot
from service.users.repository import get_user_by_email
from tests.conftest import TEST_ENV
from tests.integration.conftest import api_client, refresh_market, start_worker
from tests.support import ApiUser, eventually, worker_opener

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

BODY = {"index": "BLUECHIP", "size": "1000", "direction": "long"}


@pytest_asyncio.fixture
async def client(seeded_database: str) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(get_settings()) as http:
        yield http


async def _store_key(sessions: Any, user: ApiUser) -> None:
    async with sessions() as session:
        found = await get_user_by_email(session, user.email)
        assert found is not None
        await store_credentials(
            session, worker_opener(), found.id, api_key=user.api_key, api_secret=user.api_secret
        )


async def _opened(client: httpx.AsyncClient, user: ApiUser) -> dict[str, Any]:
    created = await client.post("/api/positions", json=BODY, headers=user.headers)
    assert created.status_code == 202, created.text
    url = created.headers["Location"]

    async def final() -> dict[str, Any] | None:
        body = (await client.get(url, headers=user.headers)).json()
        return body if body["status"] in ("ACTIVE", "FAILED") else None

    return await eventually(final, timeout=60, message="the position final")


async def test_a_plain_client_with_the_redis_url_cannot_control_a_worker(
    client: httpx.AsyncClient,
    service_env: dict[str, str],
    funded_user: ApiUser,
    sessions: Any,
    tmp_path: Path,
) -> None:
    worker = start_worker(service_env, tmp_path)
    intruder = Celery("intruder", broker=TEST_ENV["REDIS_URL"])
    try:
        await _store_key(sessions, funded_user)
        # The worker is up and consuming: it runs a basket.
        assert (await _opened(client, funded_user))["status"] == "ACTIVE"

        # What the attacker tried: ping, list the queues, shut it down.
        assert intruder.control.ping(timeout=1.0) == []
        assert intruder.control.inspect(timeout=1.0).active_queues() is None
        intruder.control.broadcast("shutdown")
        intruder.control.broadcast("pool_shrink", arguments={"n": 2})

        # Still running, and still executing: the next basket goes ACTIVE too.
        assert (await _opened(client, funded_user))["status"] == "ACTIVE"
        assert worker.process.poll() is None
        assert "shutdown" not in worker.output().lower().replace("without", "")
    finally:
        intruder.close()
        worker.stop()


# --- The market snapshot ---------------------------------------------------------------------

INSTRUMENT = Instrument(
    symbol="BTCUSDT",
    status="Trading",
    qty_step=Decimal("0.001"),
    min_order_qty=Decimal("0.001"),
    max_order_qty=Decimal("1190"),
    max_mkt_order_qty=Decimal("100"),
    min_notional_value=Decimal("5"),
    tick_size=Decimal("0.1"),
)
GOOD = MarketSnapshot(
    instruments={"BTCUSDT": INSTRUMENT},
    prices={"BTCUSDT": Decimal("95000")},
    fetched_at=0.0,
    marks={"BTCUSDT": Decimal("95010")},
)


def _raw(snapshot: MarketSnapshot) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(snapshot.to_json())
    return data


def _poisoned() -> list[tuple[str, dict[str, Any]]]:
    now = time.time()
    good = _raw(replace(GOOD, fetched_at=now))
    cases: list[tuple[str, dict[str, Any]]] = []
    for label, price in (
        ("NaN price", "NaN"),
        ("infinite price", "Infinity"),
        ("negative price", "-95000"),
        ("zero price", "0"),
        ("not a number", "cheap"),
        ("price as a number", 95000),
    ):
        cases.append((label, {**good, "prices": {"BTCUSDT": price}}))
    instrument = good["instruments"]["BTCUSDT"]
    for label, field_, value in (
        ("zero step", "qty_step", "0"),
        ("negative step", "qty_step", "-0.001"),
        ("NaN minimum", "min_order_qty", "NaN"),
        ("another symbol", "symbol", "ETHUSDT"),
    ):
        cases.append((label, {**good, "instruments": {"BTCUSDT": {**instrument, field_: value}}}))
    missing = {k: v for k, v in instrument.items() if k != "qty_step"}
    cases.append(("missing step", {**good, "instruments": {"BTCUSDT": missing}}))
    cases.append(("no prices", {k: v for k, v in good.items() if k != "prices"}))
    cases.append(("NaN fetched_at", {**good, "fetched_at": float("nan")}))
    cases.append(("fetched_at a string", {**good, "fetched_at": str(now)}))
    cases.append(("far-future fetched_at", {**good, "fetched_at": now + 10 * 365 * 86400}))
    cases.append(("a list", [good]))  # type: ignore[list-item]
    return cases


@pytest_asyncio.fixture
async def redis() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(TEST_ENV["REDIS_URL"])
    yield client
    await client.aclose()


async def test_a_forged_snapshot_is_refused_and_the_good_copy_keeps_serving(
    redis: aioredis.Redis,
) -> None:
    key = f"test-market-{secrets.token_hex(6)}"
    try:
        for label, forged in _poisoned():
            # With nothing good in memory: as if there were no snapshot at all.
            await redis.set(key, json.dumps(forged), ex=60)
            fresh = MarketCache(redis, max_age_seconds=60, reuse_seconds=0, key=key)
            assert await fresh.load() is None, label
            # With a good one in memory: that one is served, never the forgery.
            cache = MarketCache(redis, max_age_seconds=60, reuse_seconds=0, key=key)
            await cache.store(replace(GOOD, fetched_at=time.time()))
            await redis.set(key, json.dumps(forged), ex=60)
            served = await cache.load()
            assert served is not None, label
            assert served.prices == GOOD.prices, label
            assert served.instruments == GOOD.instruments, label
            assert served.fetched_at <= time.time(), label
        # A little ahead (clock skew between hosts) is accepted; what the job writes expires.
        skewed = replace(GOOD, fetched_at=time.time() + 2)
        await redis.set(key, skewed.to_json())
        cache = MarketCache(redis, max_age_seconds=60, reuse_seconds=0, key=key)
        assert await cache.load() is not None
        await cache.store(replace(GOOD, fetched_at=time.time()))
        assert 0 < await redis.ttl(key) <= 61
        # A snapshot written before max_order_qty and tick_size were kept still loads.
        old = _raw(replace(GOOD, fetched_at=time.time()))
        for name in ("max_order_qty", "tick_size"):
            del old["instruments"]["BTCUSDT"][name]
        await redis.set(key, json.dumps(old))
        loaded = await MarketCache(redis, max_age_seconds=60, reuse_seconds=0, key=key).load()
        assert loaded is not None
        assert loaded.instruments["BTCUSDT"].max_order_qty == Decimal("100")
    finally:
        await redis.delete(key)


async def test_the_api_answers_503_not_500_with_a_forged_snapshot(
    redis: aioredis.Redis, sessions: Any, simulator_url: str, funded_user: ApiUser
) -> None:
    await _store_key(sessions, funded_user)
    live = await redis.get(CACHE_KEY)
    assert live is not None
    real = json.loads(live)
    symbol = next(iter(real["prices"]))
    forgeries = {
        "far-future fetched_at": {**real, "fetched_at": time.time() + 365 * 86400},
        "poisoned price": {**real, "prices": {**real["prices"], symbol: "NaN"}},
        "zero step": {
            **real,
            "instruments": {
                **real["instruments"],
                symbol: {**real["instruments"][symbol], "qty_step": "0"},
            },
        },
    }
    try:
        for label, forged in forgeries.items():
            await redis.set(CACHE_KEY, json.dumps(forged), ex=60)
            # A freshly started API: no good copy in memory to fall back on.
            async with api_client(get_settings()) as client:
                answer = await client.post("/api/positions", json=BODY, headers=funded_user.headers)
            assert answer.status_code == 503, (label, answer.status_code, answer.text)
            assert "market data" in answer.json()["detail"], label
    finally:
        await refresh_market(sessions, simulator_url)
    # The real snapshot back: the same request is accepted.
    async with api_client(get_settings()) as client:
        accepted = await client.post("/api/positions", json=BODY, headers=funded_user.headers)
    assert accepted.status_code == 202, accepted.text
