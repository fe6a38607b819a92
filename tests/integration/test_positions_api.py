"""The position API for the frontend: idempotent POST, cheap polling, pages, revocation,
broker outages and credential key rotation."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from cryptography.fernet import Fernet
from sqlalchemy import func, select

from service.config import get_settings
from service.credentials.service import rotate_all
from service.execution.recovery import recover_stale_positions
from service.market.snapshot import MarketCache
from service.models import ExchangeCredential, SyntheticPosition
from service.queue import RedisTaskPublisher
from service.security import CredentialCipher
from service.users.service import revoke_user_tokens
from tests.conftest import TEST_ENV
from tests.integration.conftest import api_client, new_user, start_worker
from tests.support import ApiUser, eventually, free_port

pytestmark = [pytest.mark.integration]

BODY = {"index": "BLUECHIP", "size": "1000", "direction": "long"}


@pytest_asyncio.fixture
async def client(seeded_database: str) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(get_settings()) as http:
        yield http


async def _user_with_credentials(
    client: httpx.AsyncClient, sessions: object
) -> tuple[str, dict[str, str]]:
    email, token = await new_user(sessions)
    headers = {"Authorization": f"Bearer {token}"}
    response = await client.put(
        "/api/credentials",
        json={"api_key": "KEY" + secrets.token_hex(6), "api_secret": secrets.token_hex(16)},
        headers=headers,
    )
    assert response.status_code == 200
    return email, headers


@pytest.mark.asyncio
async def test_idempotency_key_returns_the_first_position(
    client: httpx.AsyncClient, sessions: object
) -> None:
    _, headers = await _user_with_credentials(client, sessions)
    keyed = {**headers, "Idempotency-Key": "intent-1"}
    first = await client.post("/api/positions", json=BODY, headers=keyed)
    again = await client.post("/api/positions", json={**BODY, "size": "1000.00"}, headers=keyed)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"

    different = await client.post("/api/positions", json={**BODY, "size": "1001"}, headers=keyed)
    assert different.status_code == 422
    assert "different request" in different.json()["detail"]

    # Keys are per user: another user's same key is another position.
    _, other = await _user_with_credentials(client, sessions)
    theirs = await client.post(
        "/api/positions", json=BODY, headers={**other, "Idempotency-Key": "intent-1"}
    )
    assert theirs.status_code == 202
    assert theirs.json()["id"] != first.json()["id"]

    # Without the header, two identical requests are two positions.
    one = await client.post("/api/positions", json=BODY, headers=headers)
    two = await client.post("/api/positions", json=BODY, headers=headers)
    assert one.json()["id"] != two.json()["id"]


@pytest.mark.asyncio
async def test_twenty_parallel_posts_with_one_key_make_one_position(
    client: httpx.AsyncClient, sessions: object
) -> None:
    _, headers = await _user_with_credentials(client, sessions)
    keyed = {**headers, "Idempotency-Key": str(uuid.uuid4())}
    responses = await asyncio.gather(
        *(client.post("/api/positions", json=BODY, headers=keyed) for _ in range(20))
    )
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1
    listed = await client.get("/api/positions", headers=headers)
    assert len(listed.json()["items"]) == 1


@pytest.mark.asyncio
async def test_polling_with_etag_gets_304_until_something_changes(
    client: httpx.AsyncClient, sessions: object
) -> None:
    _, headers = await _user_with_credentials(client, sessions)
    created = await client.post("/api/positions", json=BODY, headers=headers)
    url = created.headers["Location"]
    first = await client.get(url, headers=headers)
    tag = first.headers["ETag"]
    unchanged = await client.get(url, headers={**headers, "If-None-Match": tag})
    assert unchanged.status_code == 304
    assert unchanged.content == b""
    assert unchanged.headers["ETag"] == tag

    # The worker's claim changes the position: the old tag no longer matches.
    async with sessions() as session:  # type: ignore[operator]
        position = await session.get(SyntheticPosition, uuid.UUID(first.json()["id"]))
        position.status = "EXECUTING"
        position.updated_at = func.clock_timestamp()
    changed = await client.get(url, headers={**headers, "If-None-Match": tag})
    assert changed.status_code == 200
    assert changed.json()["status"] == "EXECUTING"
    assert changed.headers["ETag"] != tag


@pytest.mark.asyncio
async def test_a_rendered_body_is_served_only_to_its_owner_and_only_while_unchanged(
    client: httpx.AsyncClient, sessions: object
) -> None:
    email, headers = await _user_with_credentials(client, sessions)
    _, stranger = await _user_with_credentials(client, sessions)
    created = await client.post("/api/positions", json=BODY, headers=headers)
    url = created.headers["Location"]
    first = await client.get(url, headers=headers)  # rendered, and kept for its ETag
    again = await client.get(url, headers=headers)
    assert again.status_code == 200
    assert again.content == first.content
    assert again.headers["ETag"] == first.headers["ETag"]
    # The kept body is no shortcut past the token check or the owner check.
    assert (await client.get(url, headers=stranger)).status_code == 404
    assert (
        await client.get(url, headers={**stranger, "If-None-Match": first.headers["ETag"]})
    ).status_code == 404

    async with sessions() as session:  # type: ignore[operator]
        position = await session.get(SyntheticPosition, uuid.UUID(first.json()["id"]))
        position.status = "EXECUTING"
        position.updated_at = func.clock_timestamp()
    changed = await client.get(url, headers=headers)
    assert changed.status_code == 200
    assert changed.json()["status"] == "EXECUTING"
    assert changed.headers["ETag"] != first.headers["ETag"]

    async with sessions() as session:  # type: ignore[operator]
        assert await revoke_user_tokens(session, email) == 1
    assert (await client.get(url, headers=headers)).status_code == 401
    tagged = {**headers, "If-None-Match": changed.headers["ETag"]}
    assert (await client.get(url, headers=tagged)).status_code == 401


@pytest.mark.asyncio
async def test_list_is_paginated_newest_first_and_filterable(
    client: httpx.AsyncClient, sessions: object
) -> None:
    _, headers = await _user_with_credentials(client, sessions)
    ids = [
        (await client.post("/api/positions", json=BODY, headers=headers)).json()["id"]
        for _ in range(5)
    ]
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, str | int] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get("/api/positions", params=params, headers=headers)).json()
        seen.extend(item["id"] for item in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    pending = await client.get("/api/positions", params={"status": "PENDING"}, headers=headers)
    assert len(pending.json()["items"]) == 5
    active = await client.get("/api/positions", params={"status": "ACTIVE"}, headers=headers)
    assert active.json()["items"] == []
    bad = await client.get("/api/positions", params={"cursor": "%%%"}, headers=headers)
    assert bad.status_code == 422
    bad_status = await client.get("/api/positions", params={"status": "NOPE"}, headers=headers)
    assert bad_status.status_code == 422


@pytest.mark.asyncio
async def test_revoked_token_is_refused(client: httpx.AsyncClient, sessions: object) -> None:
    email, headers = await _user_with_credentials(client, sessions)
    assert (await client.get("/api/positions", headers=headers)).status_code == 200
    async with sessions() as session:  # type: ignore[operator]
        assert await revoke_user_tokens(session, email) == 1
    response = await client.get("/api/positions", headers=headers)
    assert response.status_code == 401


@pytest.mark.asyncio
async def test_unreachable_broker_still_answers_202_and_the_sweep_sends_it_later(
    seeded_database: str, sessions: object
) -> None:
    # A broker URL where nothing listens: the publish fails, the row stays PENDING.
    down = get_settings().model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    live = aioredis.from_url(TEST_ENV["REDIS_URL"])
    snapshot = await MarketCache(live, max_age_seconds=600).load()
    await live.aclose()
    assert snapshot is not None
    async with api_client(down) as client:
        # The API had read the market snapshot before Redis went away.
        client._transport.app.state.market_cache.remember(snapshot)  # type: ignore[attr-defined]
        _, headers = await _user_with_credentials(client, sessions)
        created = await client.post("/api/positions", json=BODY, headers=headers)
        assert created.status_code == 202
        position_id = uuid.UUID(created.json()["id"])
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["broker"] != "ok"

    broker = aioredis.from_url(TEST_ENV["REDIS_URL"])
    queue = TEST_ENV["CELERY_QUEUE"]
    await broker.delete(queue)
    publisher = RedisTaskPublisher(broker, queue=queue)

    async def resent() -> bool:
        report = await recover_stale_positions(
            sessions,  # type: ignore[arg-type]
            publisher,
            stale_pending_seconds=0.5,
            stale_executing_seconds=60,
            max_runs=5,
        )
        return position_id in report.resent_pending

    await eventually(resent, timeout=10, interval=0.2, message="the sweep re-sends")
    messages = await broker.lrange(queue, 0, -1)
    assert any(str(position_id).encode() in m for m in messages)
    await broker.delete(queue)
    await broker.aclose()


@pytest.mark.asyncio
async def test_key_rotation_while_positions_execute_loses_nothing(
    service_env: dict[str, str],
    sessions: object,
    sim: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    old_key = TEST_ENV["CREDENTIALS_KEYS"]
    new_key = Fernet.generate_key().decode()
    # Step 1 of a rotation: every process gets "new,old"; step 2: rotate the rows.
    rotated_env = {**service_env, "CREDENTIALS_KEYS": f"{new_key},{old_key}"}
    worker = start_worker(rotated_env, tmp_path)
    try:
        users: list[ApiUser] = []
        async with api_client(get_settings()) as client:  # the API still on the old key
            for _ in range(4):
                _, token = await new_user(sessions)
                user = ApiUser(
                    email="",
                    token=token,
                    api_key=f"RK{secrets.token_hex(8).upper()}",
                    api_secret=secrets.token_hex(16),
                )
                await sim.post(
                    "/sim/accounts",
                    json={
                        "api_key": user.api_key,
                        "api_secret": user.api_secret,
                        "balance": "100000",
                    },
                )
                await client.put(
                    "/api/credentials",
                    json={"api_key": user.api_key, "api_secret": user.api_secret},
                    headers=user.headers,
                )
                users.append(user)
            created = [
                await client.post(
                    "/api/positions", json={**BODY, "size": "1000"}, headers=u.headers
                )
                for u in users
            ]
            rotated = await rotate_all(
                sessions,
                CredentialCipher(f"{new_key},{old_key}"),  # type: ignore[arg-type]
            )
            assert rotated.rotated >= 4

            async def all_final(
                client: httpx.AsyncClient = client, created: list[httpx.Response] = created
            ) -> list[str] | None:
                statuses = [
                    (await client.get(c.headers["Location"], headers=u.headers)).json()["status"]
                    for c, u in zip(created, users, strict=True)
                ]
                final = all(s in ("ACTIVE", "FAILED") for s in statuses)
                return statuses if final else None

            statuses = await eventually(all_final, timeout=60, message="all positions final")
            errors = [
                (await client.get(c.headers["Location"], headers=u.headers)).json()["error"]
                for c, u in zip(created, users, strict=True)
            ]
        assert statuses == ["ACTIVE"] * 4, errors
        # Every row now decrypts with the new key alone (but those no key could read, which
        # the rotation reported and left as they were).
        only_new = CredentialCipher(new_key)
        async with sessions() as session:  # type: ignore[operator]
            rows = (await session.execute(select(ExchangeCredential))).scalars().all()
        for row in rows:
            if row.user_id not in rotated.unreadable:
                only_new.decrypt(row.api_secret_encrypted)
    finally:
        worker.stop()


@pytest.mark.asyncio
async def test_the_task_is_published_after_the_request_s_transaction_commits(
    client: httpx.AsyncClient, sessions: object
) -> None:
    _, headers = await _user_with_credentials(client, sessions)
    seen: list[tuple[uuid.UUID, str | None]] = []

    class CheckingPublisher:
        """Reads the row from another connection at the moment of the publish."""

        async def try_publish(self, position_id: uuid.UUID) -> bool:
            async with sessions() as session:  # type: ignore[operator]
                row = await session.get(SyntheticPosition, position_id)
            seen.append((position_id, row.status if row is not None else None))
            return True

    app = client._transport.app  # type: ignore[attr-defined]
    real = app.state.publisher
    app.state.publisher = CheckingPublisher()
    try:
        created = await client.post("/api/positions", json=BODY, headers=headers)
        refused = await client.post(
            "/api/positions", json={**BODY, "size": "0.01"}, headers=headers
        )
    finally:
        app.state.publisher = real
    assert created.status_code == 202
    assert refused.status_code == 422
    # One publish, for the accepted position only, of a row already committed.
    assert seen == [(uuid.UUID(created.json()["id"]), "PENDING")]
