"""Budgets per user (service/budgets.py), against real API processes sharing one Redis.

- The request rate: past the burst, 429 with Retry-After and nothing written (no row, no
  task, the Idempotency-Key still free); polling counts too; another user is unaffected.
- The positions not yet final: 50 concurrent POSTs of one user, spread over two API
  processes, create exactly the budget; the rest are 429 with nothing written; a replay of a
  created position is still answered; another user is unaffected; a close is never refused
  by it (it reduces what the user holds), and once CLOSING it counts against new openings.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from sqlalchemy import text

from tests.conftest import TEST_ENV
from tests.integration.conftest import funded_trader
from tests.support import ApiUser, ServiceProcess, free_port, wait_for_port

pytestmark = pytest.mark.integration

ORDER = {"index": "TOP10", "size": "1000", "direction": "long"}


def _start_api(env: dict[str, str], log_dir: Path, **budgets: str) -> tuple[ServiceProcess, str]:
    port = free_port()
    # An exchange address of its own: its key checks (PUT) wait for no other test's calls.
    egress = {"BYBIT_EGRESS_ID": f"budgets-{secrets.token_hex(4)}"}
    process = ServiceProcess(
        ["api", "--port", str(port)],
        {**env, **egress, **budgets},
        log_dir / f"api-{port}.log",
    )
    wait_for_port(port, process.process)
    return process, f"http://127.0.0.1:{port}"


@pytest.fixture
def rate_api(service_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """An API whose users get 5 requests at once, then one a second."""
    process, url = _start_api(
        service_env,
        tmp_path,
        USER_REQUESTS_PER_MINUTE="60",
        USER_REQUEST_BURST="5",
        USER_OPEN_POSITIONS="1000",
    )
    try:
        yield url
    finally:
        process.stop()


@pytest.fixture
def open_apis(service_env: dict[str, str], tmp_path: Path) -> Iterator[list[str]]:
    """Two API processes (the budgets are shared through Redis) allowing 10 open positions."""
    budgets = {
        "USER_REQUESTS_PER_MINUTE": "100000",
        "USER_REQUEST_BURST": "10000",
        "USER_OPEN_POSITIONS": "10",
    }
    started = [_start_api(service_env, tmp_path, **budgets) for _ in range(2)]
    try:
        yield [url for _, url in started]
    finally:
        for process, _ in started:
            process.stop()


async def _rows(sessions: object, user: ApiUser) -> int:
    async with sessions() as session:  # type: ignore[operator]
        count = await session.scalar(
            text(
                "SELECT count(*) FROM synthetic_positions AS p JOIN api_tokens AS t "
                "ON t.user_id = p.user_id WHERE t.token_hash = :hash"
            ),
            {"hash": _hash(user.token)},
        )
    return int(count or 0)


def _hash(token: str) -> str:
    from service.security import hash_token

    return hash_token(token)


async def _queued(redis: aioredis.Redis) -> int:
    return int(await redis.llen(TEST_ENV["CELERY_QUEUE"]))


def _assert_429(response: httpx.Response, budget: str) -> None:
    assert response.status_code == 429, response.text
    retry_after = response.headers["Retry-After"]
    assert retry_after.isdigit()
    assert int(retry_after) >= 1
    detail = response.json()["detail"]
    assert budget in detail
    assert "try again in" in detail


@pytest.mark.asyncio
async def test_past_the_request_rate_429_with_retry_after_and_nothing_written(
    rate_api: str, sim: httpx.AsyncClient, sessions: object, redis: aioredis.Redis
) -> None:
    async with httpx.AsyncClient(base_url=rate_api, timeout=10) as api:
        # The PUT takes one of 5.
        flooder = await funded_trader(sessions, sim, api, balance="100000000")
        other = await funded_trader(sessions, sim, api, balance="100000000")
        queued = await _queued(redis)
        answers = [
            await api.post("/api/positions", json=ORDER, headers=flooder.headers) for _ in range(4)
        ]
        assert [a.status_code for a in answers] == [202] * 4
        refused = await api.post(
            "/api/positions",
            json=ORDER,
            headers={**flooder.headers, "Idempotency-Key": "after-the-flood"},
        )
        _assert_429(refused, "request rate budget")
        # Nothing written: 4 rows, 4 tasks, and the Idempotency-Key still free.
        assert await _rows(sessions, flooder) == 4
        assert await _queued(redis) == queued + 4
        # Polling counts against the same budget.
        polled = await api.get(f"/api/positions/{answers[0].json()['id']}", headers=flooder.headers)
        _assert_429(polled, "request rate budget")
        # Another user is not affected.
        theirs = await api.post("/api/positions", json=ORDER, headers=other.headers)
        assert theirs.status_code == 202, theirs.text

        # Once the bucket has refilled (one a second), the key opens a new position.
        await asyncio.sleep(int(refused.headers["Retry-After"]))
        later = await api.post(
            "/api/positions",
            json=ORDER,
            headers={**flooder.headers, "Idempotency-Key": "after-the-flood"},
        )
        assert later.status_code == 202, later.text
        assert "Idempotent-Replayed" not in later.headers
        assert await _rows(sessions, flooder) == 5


@pytest.mark.asyncio
async def test_fifty_concurrent_posts_create_at_most_the_open_positions_budget(
    open_apis: list[str], sim: httpx.AsyncClient, sessions: object, redis: aioredis.Redis
) -> None:
    clients = [httpx.AsyncClient(base_url=url, timeout=30) for url in open_apis]
    try:
        flooder = await funded_trader(sessions, sim, clients[0], balance="100000000")
        other = await funded_trader(sessions, sim, clients[1], balance="100000000")
        first = await clients[0].post(
            "/api/positions", json=ORDER, headers={**flooder.headers, "Idempotency-Key": "one"}
        )
        assert first.status_code == 202
        queued = await _queued(redis)
        # No worker runs: every position created stays PENDING, so 9 more fit.
        answers = await asyncio.gather(
            *(
                clients[i % 2].post("/api/positions", json=ORDER, headers=flooder.headers)
                for i in range(50)
            )
        )
        codes = [a.status_code for a in answers]
        assert codes.count(202) == 9, codes
        assert codes.count(429) == 41, codes
        for refused in (a for a in answers if a.status_code == 429):
            _assert_429(refused, "budget")
        assert await _rows(sessions, flooder) == 10
        assert await _queued(redis) == queued + 9
        open_refusal = next(a for a in answers if "open positions budget" in a.text)
        assert "10" in open_refusal.json()["detail"]

        # A replay of a created position is answered, not refused.
        replay = await clients[1].post(
            "/api/positions", json=ORDER, headers={**flooder.headers, "Idempotency-Key": "one"}
        )
        assert replay.status_code == 202, replay.text
        assert replay.headers.get("Idempotent-Replayed") == "true"
        assert replay.json()["id"] == first.json()["id"]
        # Another user is not affected.
        theirs = await clients[1].post("/api/positions", json=ORDER, headers=other.headers)
        assert theirs.status_code == 202, theirs.text

        # A position reaching a final status frees a place.
        await _set_status(sessions, uuid.UUID(first.json()["id"]), "ACTIVE")
        again = await clients[0].post("/api/positions", json=ORDER, headers=flooder.headers)
        assert again.status_code == 202, again.text
        # A close is never refused by the open-positions budget, even with 10 open: it
        # reduces what the user holds. Once CLOSING, it counts against new openings.
        close = await clients[0].post(
            f"/api/positions/{first.json()['id']}/close", headers=flooder.headers
        )
        assert close.status_code == 202, close.text
        assert close.json()["status"] == "CLOSING"
        await _set_status(sessions, uuid.UUID(again.json()["id"]), "FAILED")
        refused = await clients[0].post("/api/positions", json=ORDER, headers=flooder.headers)
        _assert_429(refused, "open positions budget")
        assert await _rows(sessions, flooder) == 11
    finally:
        for client in clients:
            await client.aclose()


async def _set_status(sessions: object, position_id: uuid.UUID, status: str) -> None:
    """What a worker's run would do, done directly: no worker runs in these tests."""
    async with sessions() as session:  # type: ignore[operator]
        await session.execute(
            text("UPDATE synthetic_positions SET status = :status WHERE id = :id"),
            {"status": status, "id": position_id},
        )
        await session.commit()


@pytest.mark.asyncio
async def test_redis_unreachable_the_budgets_fail_open() -> None:
    """A budget is a protection, not a condition of trading: with Redis away, requests go on
    (the shared exchange limiter, which fails closed, still guards the exchange)."""
    from service.budgets import Budgets

    down = aioredis.from_url(
        f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1, socket_connect_timeout=1
    )
    try:
        budgets = Budgets(down, requests_per_minute=1, request_burst=1, open_positions=1)
        user_id = uuid.uuid4()
        for _ in range(3):
            await budgets.take_request(user_id)
            async with budgets.admission(user_id):
                pass
    finally:
        await down.aclose()


@pytest.mark.asyncio
async def test_an_admission_that_does_not_get_its_turn_is_a_429_with_nothing_written(
    open_apis: list[str], sim: httpx.AsyncClient, sessions: object
) -> None:
    """The user's admission lock held elsewhere (a stalled admission of another process):
    the POST waits ADMISSION_WAIT_SECONDS at most, then 429 with nothing written; on both the
    hot path and the full path (a user without credentials goes there), never a 500 or 503.
    Once the lock is free, the next POST is admitted."""
    from service.positions.locks import admission_lock_keys
    from tests.integration.conftest import new_user

    async with httpx.AsyncClient(base_url=open_apis[0], timeout=30) as client:
        trader = await funded_trader(sessions, sim, client, balance="100000000")
        email, token = await new_user(sessions)
        keyless = ApiUser(email, token, "", "")
        async with sessions() as session:  # type: ignore[operator]
            ids = {
                name: (
                    await session.execute(
                        text("SELECT user_id FROM api_tokens WHERE token_hash = :hash"),
                        {"hash": _hash(user.token)},
                    )
                ).scalar_one()
                for name, user in (("trader", trader), ("keyless", keyless))
            }
        holder = await asyncpg.connect(TEST_ENV["DATABASE_URL"].replace("+asyncpg", ""))
        try:
            for user_id in ids.values():
                keys = admission_lock_keys(user_id)
                await holder.execute("SELECT pg_advisory_lock($1, $2)", *keys)
            for user in (trader, keyless):
                refused = await client.post("/api/positions", json=ORDER, headers=user.headers)
                _assert_429(refused, "concurrent position requests")
                assert await _rows(sessions, user) == 0
            await holder.execute("SELECT pg_advisory_unlock_all()")
            admitted = await client.post("/api/positions", json=ORDER, headers=trader.headers)
            assert admitted.status_code == 202, admitted.text
            # The full path, its turn had: the answer it always gave (no credentials).
            keyless_answer = await client.post(
                "/api/positions", json=ORDER, headers=keyless.headers
            )
            assert keyless_answer.status_code == 409, keyless_answer.text
        finally:
            await holder.close()
