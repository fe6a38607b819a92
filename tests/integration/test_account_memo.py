"""The account memo in Redis (service/account_memo.py), on the machine's Redis: what one
worker writes every worker reads, each entry with its own time to live, one command for a
basket's symbols."""

from __future__ import annotations

import secrets

import pytest
import redis.asyncio as aioredis

from service.account_memo import (
    ACCOUNT_UID_TTL_SECONDS,
    LEVERAGE_TTL_SECONDS,
    POSITION_MODE_TTL_SECONDS,
    RedisAccountMemo,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


async def test_what_one_worker_learns_every_worker_reads_until_it_expires(
    redis: aioredis.Redis,
) -> None:
    prefix = f"test-memo-{secrets.token_hex(4)}"
    writer, reader = RedisAccountMemo(redis, prefix), RedisAccountMemo(redis, prefix)
    symbols = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
    assert await reader.leverage_confirmed("acct", symbols) == set()
    assert await reader.hedge_modes("acct", symbols) == {}

    await writer.confirm_leverage("acct", ["BTCUSDT", "SOLUSDT"])
    await writer.remember_hedge_modes("acct", {"BTCUSDT": False, "ETHUSDT": True})
    await writer.remember_exchange_uid("acct", "uid-7")

    assert await reader.leverage_confirmed("acct", symbols) == {"BTCUSDT", "SOLUSDT"}
    assert await reader.hedge_modes("acct", symbols) == {"BTCUSDT": False, "ETHUSDT": True}
    assert await reader.exchange_uid("acct") == "uid-7"
    # Another account's entries are its own.
    assert await reader.leverage_confirmed("other", symbols) == set()

    # Each entry has its kind's time to live.
    ttl = {
        "leverage:acct:BTCUSDT": LEVERAGE_TTL_SECONDS,
        "leverage:acct:SOLUSDT": LEVERAGE_TTL_SECONDS,
        "mode:acct:BTCUSDT": POSITION_MODE_TTL_SECONDS,
        "mode:acct:ETHUSDT": POSITION_MODE_TTL_SECONDS,
        "uid:acct:": ACCOUNT_UID_TTL_SECONDS,
    }
    for key, seconds in ttl.items():
        left_ms = await redis.pttl(f"{prefix}:{key}")
        assert seconds * 1000 - 5000 < left_ms <= seconds * 1000, key

    # A mode learnt again replaces the old one; an entry gone (expired) is not known.
    await writer.remember_hedge_modes("acct", {"ETHUSDT": False})
    assert await reader.hedge_modes("acct", ["ETHUSDT"]) == {"ETHUSDT": False}
    await redis.delete(f"{prefix}:leverage:acct:SOLUSDT")
    assert await reader.leverage_confirmed("acct", symbols) == {"BTCUSDT"}
    await redis.delete(*[f"{prefix}:{key}" for key in ttl])


async def test_a_memo_whose_redis_is_gone_knows_nothing_and_does_not_fail(
    redis: aioredis.Redis,
) -> None:
    # Nothing listens on port 1: every command fails at once.
    gone = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    try:
        memo = RedisAccountMemo(gone, f"test-memo-{secrets.token_hex(4)}")
        await memo.confirm_leverage("acct", ["BTCUSDT"])  # only a saving: not an error
        await memo.remember_hedge_modes("acct", {"BTCUSDT": True})
        assert await memo.leverage_confirmed("acct", ["BTCUSDT"]) == set()
        assert await memo.hedge_modes("acct", ["BTCUSDT"]) == {}
        assert await memo.exchange_uid("acct") is None
    finally:
        await gone.aclose()
