"""The API's market snapshot when Redis loses it: found in the reliability scenario where
Redis restarted empty and every POST got 503 until Beat wrote the snapshot again."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from service.market.snapshot import MarketCache, MarketSnapshot
from tests.conftest import TEST_ENV
from tests.support import btc_instrument

pytestmark = pytest.mark.integration

SNAPSHOT = MarketSnapshot(
    instruments={"BTCUSDT": btc_instrument()},
    prices={"BTCUSDT": Decimal("95000")},
    fetched_at=0.0,
)


@pytest_asyncio.fixture
async def redis() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(TEST_ENV["REDIS_URL"])
    yield client
    await client.aclose()


@pytest.mark.asyncio
async def test_a_snapshot_lost_by_redis_is_served_from_memory_until_its_max_age(
    redis: aioredis.Redis,
) -> None:
    key = f"test-market-{uuid.uuid4().hex}"
    cache = MarketCache(redis, max_age_seconds=60, reuse_seconds=0, key=key)
    await cache.store(replace(SNAPSHOT, fetched_at=time.time()))
    await redis.delete(key)  # what a Redis restarted without persistence looks like
    served = await cache.load()
    assert served is not None
    assert served.prices["BTCUSDT"] == Decimal("95000")


@pytest.mark.asyncio
async def test_a_snapshot_older_than_its_max_age_is_never_served(redis: aioredis.Redis) -> None:
    key = f"test-market-{uuid.uuid4().hex}"
    cache = MarketCache(redis, max_age_seconds=60, reuse_seconds=0, key=key)
    await cache.store(replace(SNAPSHOT, fetched_at=time.time() - 61))
    await redis.delete(key)
    assert await cache.load() is None
