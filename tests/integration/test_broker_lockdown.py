"""Issue 22: the broker is not trusted. A plain Celery client holding only the Redis URL can
neither ping, inspect nor shut a worker down; a market snapshot written into Redis by hand
(fetched in the far future, or with a poisoned price or step) is refused as if absent, so
the API answers its 503 and never a 500, and a good copy in memory keeps serving. A believable
forgery (a tenth of every price, fetched now) passes the parser: the workers, holding
MARKET_SNAPSHOT_KEY, refuse any snapshot without its HMAC and size from the exchange."""

from __future__ import annotations

import hashlib
import hmac
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
from pydantic import SecretStr
from structlog.testing import capture_logs

from service.config import get_settings
from service.credentials.service import store_credentials
from service.execution import Outcome, execute_position
from service.market.snapshot import CACHE_KEY, MAC_SUFFIX, MarketCache, MarketSnapshot
from service.users.repository import get_user_by_email
from tests.conftest import TEST_ENV
from tests.integration.conftest import (
    api_client,
    execution_deps,
    pending_position,
    refresh_market,
    start_worker,
)
from tests.support import ApiUser, btc_instrument, eventually, worker_opener

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

BODY = {"index": "BLUECHIP", "size": "1000", "direction": "long"}


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

INSTRUMENT = btc_instrument()
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
        # Finite and positive, but beyond what sizing's arithmetic carries.
        ("tiny exponent", "1E-999999999"),
        ("fifty zeros then a 1", "0." + "0" * 51 + "1"),
        ("huge exponent", "1E+999999999"),
        ("too many digits", "95000." + "1" * 40),
    ):
        cases.append((label, {**good, "prices": {"BTCUSDT": price}}))
    instrument = good["instruments"]["BTCUSDT"]
    for label, field_, value in (
        ("zero step", "qty_step", "0"),
        ("negative step", "qty_step", "-0.001"),
        ("NaN minimum", "min_order_qty", "NaN"),
        ("tiny step", "qty_step", "1E-999999999"),
        ("zero minimum of a tiny exponent", "min_order_qty", "0E-999999999"),
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
    # Within the parser's bounds, yet more digits than sizing's arithmetic carries (a price
    # and step of 1E-30: ~1E+32 contracts to the 1E-30): its InvalidOperation answers 503 too.
    overflowing = {
        **real,
        "prices": {s: "1E-30" for s in real["prices"]},
        "instruments": {
            s: {**i, "qty_step": "1E-30", "min_order_qty": "1E-30"}
            for s, i in real["instruments"].items()
        },
    }
    forgeries = {
        "far-future fetched_at": {**real, "fetched_at": time.time() + 365 * 86400},
        "poisoned price": {**real, "prices": {**real["prices"], symbol: "NaN"}},
        "tiny exponent": {**real, "prices": {**real["prices"], symbol: "1E-999999999"}},
        "fifty zeros then a 1": {
            **real,
            "prices": {**real["prices"], symbol: "0." + "0" * 51 + "1"},
        },
        "sizing overflows": overflowing,
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


# --- The snapshot authenticated for the workers ----------------------------------------------


async def test_a_keyed_cache_loads_only_a_snapshot_carrying_its_mac(
    redis: aioredis.Redis,
) -> None:
    key = f"test-market-{secrets.token_hex(6)}"
    mac_key = key + MAC_SUFFIX
    secret = SecretStr(secrets.token_hex(32))

    def keyed(with_secret: SecretStr | None = secret) -> MarketCache:
        return MarketCache(redis, max_age_seconds=60, reuse_seconds=0, key=key, secret=with_secret)

    good = replace(GOOD, fetched_at=time.time())
    try:
        await keyed().store(good)
        # Written together, expiring together; the value in its usual format and key.
        assert 0 < await redis.ttl(mac_key) <= 61
        assert 0 < await redis.ttl(key) <= 61
        stored_raw = await redis.get(key)
        assert stored_raw is not None
        assert MarketSnapshot.from_json(stored_raw) == good
        # A correct MAC loads, with the key; without one (the API) the same value loads too.
        assert await keyed().load() == good
        assert await keyed(None).load() == good

        # Believable but false: a tenth of the price, fresh, that the parser accepts.
        forged = replace(good, prices={"BTCUSDT": Decimal("9500")}).to_json()
        wrong_key = SecretStr(secrets.token_hex(32))
        cases: list[tuple[str, bytes | str | None]] = [
            ("value changed, MAC kept", await redis.get(mac_key)),
            ("MAC missing", None),
            ("MAC of another key", hmac.new(b"x", forged.encode(), hashlib.sha256).hexdigest()),
        ]
        for label, mac in cases:
            await redis.set(key, forged, ex=60)
            if mac is None:
                await redis.delete(mac_key)
            else:
                await redis.set(mac_key, mac, ex=60)
            with capture_logs() as logs:
                # As if absent: nothing good in memory, nothing served.
                assert await keyed().load() is None, label
                fresh = keyed(wrong_key)
                assert await fresh.load() is None, label
                assert await fresh.load() is None, label
            refused = [e for e in logs if e["event"] == "market.snapshot_unauthenticated"]
            # Once per stored value and cache, not once per read; never the secret.
            assert len(refused) == 2, (label, logs)
            assert secret.get_secret_value() not in repr(logs)
            # The key-less cache (the API's) still reads it: it only answers with it.
            assert (await keyed(None).load()).prices["BTCUSDT"] == Decimal("9500"), label  # type: ignore[union-attr]

        # A cache that stored or loaded a good one keeps serving that, never the forgery
        # (nor remembers the forgery: the memory copy holds only what was accepted).
        cache = keyed()
        await cache.store(good)
        await redis.set(key, forged, ex=60)
        assert await cache.load() == good
        assert await cache.load() == good
        loader = keyed()
        await loader.store(good)
        loader = keyed()
        assert await loader.load() == good
        await redis.set(key, forged, ex=60)
        assert await loader.load() == good
        # A MAC of the right key over the exact stored bytes: a whitespace changed is refused.
        stored = good.to_json()
        await keyed().store(good)
        await redis.set(key, stored.replace(", ", ",  ", 1), ex=60)
        assert await keyed().load() is None
    finally:
        await redis.delete(key, mac_key)


async def test_the_worker_never_sizes_from_a_forged_price(
    redis: aioredis.Redis,
    client: httpx.AsyncClient,
    service_env: dict[str, str],
    funded_user: ApiUser,
    sessions: Any,
    tmp_path: Path,
) -> None:
    """Whoever can write to Redis writes a believable snapshot (a tenth of every real price,
    fetched now): the worker, holding MARKET_SNAPSHOT_KEY, refuses it for want of a MAC and
    sizes from the exchange's (the simulator's) prices, not ten times the quantity."""
    assert service_env["MARKET_SNAPSHOT_KEY"]
    await _store_key(sessions, funded_user)
    live = await redis.get(CACHE_KEY)
    assert live is not None
    before = json.loads(live)
    # One task per pool process: a run never finds the refresh's copy in memory (what it
    # stored itself) and reads the snapshot in Redis, as it would once that copy is 2 s old.
    worker = start_worker(service_env, tmp_path, "--max-tasks-per-child", "1")
    try:
        # The worker refreshes the snapshot as it starts (signed): forge after that, or the
        # refresh would overwrite the forgery. No Beat runs here to refresh it again.
        async def refreshed() -> dict[str, Any] | None:
            raw = await redis.get(CACHE_KEY)
            data = json.loads(raw) if raw is not None else None
            return data if data and data["fetched_at"] > before["fetched_at"] else None

        real = await eventually(refreshed, timeout=30, message="the worker's refresh")
        real_prices = {s: Decimal(p) for s, p in real["prices"].items()}
        forged = {
            **real,
            "fetched_at": time.time(),
            "prices": {s: str(p / 10) for s, p in real_prices.items()},
        }
        for mac in ("keep", "none"):
            await redis.set(CACHE_KEY, json.dumps(forged), ex=600)
            if mac == "none":
                await redis.delete(CACHE_KEY + MAC_SUFFIX)
            # Believable: a key-less cache (the API's) accepts it.
            seen = await MarketCache(redis, max_age_seconds=600).load()
            assert seen is not None
            assert seen.prices == {s: p / 10 for s, p in real_prices.items()}

            body = await _opened(client, funded_user)
            assert body["status"] == "ACTIVE", body
            notional = Decimal(0)
            for leg in body["legs"]:
                real_price = real_prices[leg["symbol"]]
                sized_with = Decimal(leg["reference_price"])
                # The simulator's price (it may have moved a little), never the forged tenth.
                assert abs(sized_with - real_price) <= real_price / 20, (leg, real_price)
                notional += Decimal(leg["planned_quantity"]) * real_price
            # Quantities rounded down to steps from the real prices: at most the size (from
            # the forged prices they would come to about ten times it).
            assert notional <= Decimal(BODY["size"]) * Decimal("1.05"), notional

        # Refused, and said so (the runbook's event).
        async def logged() -> bool:
            return "market.snapshot_unauthenticated" in worker.output()

        await eventually(logged, timeout=10, message="the refusal logged")
    finally:
        worker.stop()


async def test_a_signed_snapshot_sizing_cannot_carry_fails_the_basket_with_nothing_sent(
    redis: aioredis.Redis,
    engine: Any,
    sessions: Any,
    sim: httpx.AsyncClient,
    simulator_url: str,
) -> None:
    """Prices and steps of 1E-30: inside the parser's bounds, beyond sizing's arithmetic (its
    InvalidOperation). Even signed (a worker's own refresh), the basket fails with a clear
    message and no order, never an unexpected exception of the task."""
    live = await redis.get(CACHE_KEY)
    assert live is not None
    real = MarketSnapshot.from_json(live)
    tiny = Decimal("1E-30")
    overflowing = replace(
        real,
        fetched_at=time.time(),
        prices=dict.fromkeys(real.prices, tiny),
        instruments={
            s: replace(i, qty_step=tiny, min_order_qty=tiny) for s, i in real.instruments.items()
        },
    )
    api_key, api_secret = f"OV{secrets.token_hex(8).upper()}", secrets.token_hex(16)
    funded = await sim.post(
        "/sim/accounts", json={"api_key": api_key, "api_secret": api_secret, "balance": "1000000"}
    )
    funded.raise_for_status()
    try:
        secret = get_settings().market_snapshot_key
        await MarketCache(redis, max_age_seconds=600, secret=secret).store(overflowing)
        async with execution_deps(
            engine, sessions, simulator_url, as_a_worker=True, market_max_age_seconds=600
        ) as deps:
            position_id = await pending_position(
                sessions, deps.cipher, api_key=api_key, api_secret=api_secret
            )
            result = await execute_position(deps, position_id, task_id="overflow")
        assert result.outcome is Outcome.FAILED, result
        assert "cannot plan the basket" in (result.detail or ""), result.detail
        orders = (await sim.get("/sim/orders", params={"api_key": api_key})).json()["orders"]
        assert orders == []
    finally:
        await refresh_market(sessions, simulator_url)
