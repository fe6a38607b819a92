"""The shared rate limits in Redis (service/rate_limits.py), with real Redis: windows per
address and per account and endpoint, limits learnt from Bybit's headers, and an IP ban that
every process sees."""

from __future__ import annotations

import secrets
import time
from decimal import Decimal

import httpx
import pytest
import redis.asyncio as aioredis

from service import rate_limits
from service.bybit.auth import ApiCredentials
from service.bybit.client import BybitClient, create_http_session
from service.bybit.errors import BybitIpBanError, BybitRateLimitError
from service.rate_limits import ACCOUNT_WINDOW_MS, RedisCallGate
from tests.support import eventually

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]
ORDER = "/v5/order/create"


def _gate(redis: aioredis.Redis, prefix: str, **options: object) -> RedisCallGate:
    # A prefix of its own per test: nothing shared with other tests or runs.
    return RedisCallGate(redis, prefix=prefix, **options)  # type: ignore[arg-type]


@pytest.fixture
def prefix() -> str:
    return f"test-limits-{secrets.token_hex(4)}"


async def _taken(gate: RedisCallGate, path: str, account: str | None, calls: int) -> int:
    """How many of `calls` got a slot; every refusal says how long the real wait is."""
    taken, waits = 0, []
    for _ in range(calls):
        try:
            await gate.before(path, account)
            taken += 1
        except BybitRateLimitError as error:
            waits.append(error.retry_after)
    assert all(wait is not None and 0 < wait <= 5 for wait in waits), waits
    return taken


async def test_the_address_window_counts_every_process(redis: aioredis.Redis, prefix: str) -> None:
    one = _gate(redis, prefix, ip_limit=10, share=1.0, wait_max_seconds=0)
    other = _gate(redis, prefix, ip_limit=10, share=1.0, wait_max_seconds=0)
    assert await _taken(one, "/v5/market/tickers", None, 6) == 6
    assert await _taken(other, "/v5/market/tickers", None, 6) == 4  # 10 in all, whoever asks


async def test_account_windows_are_per_account_and_endpoint(
    redis: aioredis.Redis, prefix: str
) -> None:
    # The share is the address's headroom: an account's windows are Bybit's own limits, so
    # a 10-leg basket's ten orders all go within the second.
    gate = _gate(redis, prefix, share=0.5, wait_max_seconds=0)
    assert await _taken(gate, ORDER, "acct-a", 12) == 10  # order/create: 10/s
    assert await _taken(gate, ORDER, "acct-b", 12) == 10  # another account: its own window
    assert await _taken(gate, "/v5/order/realtime", "acct-a", 60) == 50  # reads: 50/s


async def test_a_batch_counts_each_of_its_orders_in_its_own_bucket(
    redis: aioredis.Redis, prefix: str
) -> None:
    batch = "/v5/order/create-batch"
    gate = _gate(redis, prefix, share=1.0, wait_max_seconds=0)
    await gate.before(batch, "acct", weight=6)  # six orders of Bybit's ten a second
    with pytest.raises(BybitRateLimitError) as refused:
        await gate.before(batch, "acct", weight=5)  # eleven would be one too many
    assert refused.value.retry_after is not None
    assert 0 < refused.value.retry_after <= ACCOUNT_WINDOW_MS / 1000 + 0.01
    await gate.before(batch, "acct", weight=4)  # ten in all: fits
    assert await _taken(gate, batch, "acct", 1) == 0
    # order/create's bucket is another one: untouched by the batches.
    assert await _taken(gate, ORDER, "acct", 10) == 10
    waiting = _gate(redis, prefix, share=1.0, wait_max_seconds=5)
    started = time.monotonic()
    await waiting.before(batch, "acct", weight=10)  # waits for the whole window to age out
    assert time.monotonic() - started >= 0.5


async def test_a_higher_limit_bybit_reports_is_used(redis: aioredis.Redis, prefix: str) -> None:
    gate = _gate(redis, prefix, wait_max_seconds=0)
    await gate.after(ORDER, "vip", {"X-Bapi-Limit": "20", "X-Bapi-Limit-Status": "19"})
    assert await _taken(gate, ORDER, "vip", 25) == 20


async def test_a_used_up_limit_blocks_the_endpoint_until_its_reset(
    redis: aioredis.Redis, prefix: str
) -> None:
    gate = _gate(redis, prefix, wait_max_seconds=0)
    # An endpoint that reports no limit ("0") is not blocked by "0 remaining".
    await gate.after(ORDER, "acct", {"X-Bapi-Limit": "0", "X-Bapi-Limit-Status": "0"})
    await gate.before(ORDER, "acct")
    await gate.after(
        ORDER, "acct", {"X-Bapi-Limit": "10", "X-Bapi-Limit-Status": "0"}, reset_in_seconds=0.3
    )
    with pytest.raises(BybitRateLimitError):
        await gate.before(ORDER, "acct")
    await gate.before("/v5/order/realtime", "acct")  # other endpoints are not blocked

    async def reset() -> bool:
        try:
            await gate.before(ORDER, "acct")
        except BybitRateLimitError:
            return False
        return True

    await eventually(reset, timeout=5, interval=0.05, message="the block lifted")


async def test_a_short_wait_is_waited_out(redis: aioredis.Redis, prefix: str) -> None:
    gate = _gate(redis, prefix, wait_max_seconds=10)
    await gate.after(ORDER, "acct", {"X-Bapi-Limit": "1", "X-Bapi-Limit-Status": "1"})
    for _ in range(2):  # one a second: the second waits for the first to leave the window
        await gate.before(ORDER, "acct")


async def test_an_ip_ban_pauses_every_process_until_it_ends(
    redis: aioredis.Redis, prefix: str, simulator_url: str, sim: httpx.AsyncClient
) -> None:
    key, secret = f"BAN{secrets.token_hex(6).upper()}", secrets.token_hex(12)
    await sim.post("/sim/accounts", json={"api_key": key, "api_secret": secret})
    credentials = ApiCredentials(api_key=key, api_secret=secret)
    await sim.post(
        "/sim/faults",
        json={"path": ORDER, "kind": "http_status", "status": 403, "api_key": key},
    )
    async with create_http_session(connect_timeout=1, read_timeout=2) as http:
        banned = BybitClient(http, simulator_url, ip_ban_seconds=1.0, gate=_gate(redis, prefix))
        other_process = BybitClient(http, simulator_url, gate=_gate(redis, prefix))
        with pytest.raises(BybitIpBanError):
            await banned.create_market_order(
                credentials,
                symbol="BTCUSDT",
                side="Buy",
                qty=Decimal("0.001"),
                order_link_id=f"ban-{secrets.token_hex(4)}",
            )
        calls_before = len((await sim.get("/sim/calls", params={"api_key": key})).json()["calls"])
        # Another process behind the same address does not even ask while the ban lasts.
        with pytest.raises(BybitIpBanError) as raised:
            await other_process.get_wallet_balance(credentials)
        assert raised.value.retry_after is not None
        assert 0 < raised.value.retry_after <= 1.0
        calls_after = len((await sim.get("/sim/calls", params={"api_key": key})).json()["calls"])
        assert calls_after == calls_before

        async def lifted() -> bool:
            try:
                await other_process.get_wallet_balance(credentials)
            except BybitIpBanError:
                return False
            return True

        await eventually(lifted, timeout=5, interval=0.1, message="the ban's end")


async def _counted(redis: aioredis.Redis, window: str, at_least: int) -> bool:
    return bool(await redis.zcard(window) >= at_least)


async def test_a_slot_taken_ahead_is_the_next_calls_own(redis: aioredis.Redis, prefix: str) -> None:
    gate = _gate(redis, prefix, wait_max_seconds=0)
    window = f"{prefix}:window:acct:{ORDER}"
    gate.ahead(ORDER, "acct")  # while another call is in flight
    await eventually(lambda: _counted(redis, window, 1), message="the slot taken ahead")
    await gate.before(ORDER, "acct")
    assert await redis.zcard(window) == 1  # the call went on the slot taken ahead
    await gate.before(ORDER, "acct")
    assert await redis.zcard(window) == 2  # the next one takes its own


async def test_a_slot_taken_ahead_too_long_ago_is_given_back(
    redis: aioredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Counted earlier than its call was sent: past the freshness it could stand for a call
    # Bybit sees after the window the limiter counted it in.
    monkeypatch.setattr(rate_limits, "AHEAD_FRESH_SECONDS", -1.0)
    gate = _gate(redis, prefix, wait_max_seconds=0)
    window = f"{prefix}:window:acct:{ORDER}"
    gate.ahead(ORDER, "acct")
    await eventually(lambda: _counted(redis, window, 1), message="the slot taken ahead")
    early = await redis.zrange(window, 0, -1)
    await gate.before(ORDER, "acct")
    now = await redis.zrange(window, 0, -1)
    assert len(now) == 1  # given back, and a new one counted
    assert now != early


async def test_a_slot_ahead_that_was_refused_lets_no_call_through(
    redis: aioredis.Redis, prefix: str
) -> None:
    gate = _gate(redis, prefix, wait_max_seconds=0)
    assert await _taken(gate, ORDER, "acct", 10) == 10  # the account's second is used up
    gate.ahead(ORDER, "acct")
    with pytest.raises(BybitRateLimitError):
        await gate.before(ORDER, "acct")
    assert await redis.zcard(f"{prefix}:window:acct:{ORDER}") == 10


async def test_slots_ahead_not_used_are_dropped(redis: aioredis.Redis, prefix: str) -> None:
    gate = _gate(redis, prefix, wait_max_seconds=0)
    window = f"{prefix}:window:acct:{ORDER}"
    gate.ahead(ORDER, "acct")
    await eventually(lambda: _counted(redis, window, 1), message="the slot taken ahead")
    gate.drop_ahead("acct")  # the run ended without the call: the slot ages out, counted
    await gate.before(ORDER, "acct")
    assert await redis.zcard(window) == 2


async def test_several_slots_taken_ahead_are_several_calls_own(
    redis: aioredis.Redis, prefix: str
) -> None:
    # A batch's orders are read side by side once it is answered: a slot for each read.
    reads = "/v5/order/realtime"
    gate = _gate(redis, prefix, wait_max_seconds=0)
    window = f"{prefix}:window:acct:{reads}"
    gate.ahead(reads, "acct", 3)
    await eventually(lambda: _counted(redis, window, 3), message="the slots taken ahead")
    for _ in range(3):
        await gate.before(reads, "acct")
    assert await redis.zcard(window) == 3
    await gate.before(reads, "acct")
    assert await redis.zcard(window) == 4


async def test_a_batch_s_slot_taken_ahead_counts_its_orders_and_is_its_own(
    redis: aioredis.Redis, prefix: str
) -> None:
    # A create-batch request's slot, taken while its proof runs: as many as its orders.
    batch = "/v5/order/create-batch"
    gate = _gate(redis, prefix, wait_max_seconds=0)
    window = f"{prefix}:window:acct:{batch}"
    gate.ahead(batch, "acct", weight=4)
    await eventually(lambda: _counted(redis, window, 4), message="the batch's slots")
    await gate.before(batch, "acct", 4)
    assert await redis.zcard(window) == 4  # the request went on the slots taken ahead
    # One of another size does not use them: it takes its own, and they stay counted.
    gate.ahead(batch, "acct", weight=4)
    await eventually(lambda: _counted(redis, window, 8), message="the next batch's slots")
    await gate.before(batch, "acct", 2)
    assert await redis.zcard(window) == 10
    gate.drop_ahead("acct")


async def test_a_batch_s_slot_taken_ahead_too_long_ago_is_given_back_whole(
    redis: aioredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rate_limits, "AHEAD_FRESH_SECONDS", -1.0)
    batch = "/v5/order/create-batch"
    gate = _gate(redis, prefix, wait_max_seconds=0)
    window = f"{prefix}:window:acct:{batch}"
    gate.ahead(batch, "acct", weight=4)
    await eventually(lambda: _counted(redis, window, 4), message="the batch's slots")
    early = set(await redis.zrange(window, 0, -1))
    await gate.before(batch, "acct", 4)
    now = set(await redis.zrange(window, 0, -1))
    assert len(now) == 4  # all four given back, and four new ones counted
    assert not now & early


async def test_a_ban_or_a_block_voids_the_slots_taken_ahead(
    redis: aioredis.Redis, prefix: str
) -> None:
    # Counted before Bybit said stop: none of them may stand for a call after it.
    gate = _gate(redis, prefix, wait_max_seconds=0)
    window = f"{prefix}:window:acct:{ORDER}"
    gate.ahead(ORDER, "acct")
    await eventually(lambda: _counted(redis, window, 1), message="the slot taken ahead")
    await gate.after(ORDER, "acct", {}, rate_limited=True, reset_in_seconds=5)
    with pytest.raises(BybitRateLimitError):
        await gate.before(ORDER, "acct")
    reads = "/v5/order/realtime"
    gate.ahead(reads, "acct")
    await eventually(
        lambda: _counted(redis, f"{prefix}:window:acct:{reads}", 1), message="the read's slot"
    )
    await gate.ban(5)
    with pytest.raises(BybitIpBanError):
        await gate.before(reads, "acct")
