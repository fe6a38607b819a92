"""The position API for the frontend: idempotent POST, cheap polling, pages, revocation,
broker outages and credential key rotation."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from sqlalchemy import func, select

from service.config import get_settings
from service.credentials.service import rotate_all
from service.execution.recovery import recover_stale_positions
from service.market.snapshot import MarketCache
from service.models import ExchangeCredential, SyntheticPosition
from service.queue import RedisTaskPublisher
from service.security import CredentialOpener, generate_key_pair, parse_private_keys
from service.users.service import revoke_user_tokens
from tests.conftest import CREDENTIALS_PAIR, TEST_ENV
from tests.integration.conftest import api_client, funded_trader, new_user, start_worker
from tests.support import ApiUser, eventually, free_port, register_key

pytestmark = [pytest.mark.integration]

BODY = {"index": "BLUECHIP", "size": "1000", "direction": "long"}


async def _user_with_credentials(
    client: httpx.AsyncClient, sessions: object
) -> tuple[str, dict[str, str]]:
    email, token = await new_user(sessions)
    headers = {"Authorization": f"Bearer {token}"}
    api_key, api_secret = "KEY" + secrets.token_hex(6), secrets.token_hex(16)
    await register_key(api_key, api_secret)  # a key the exchange knows: PUT checks it
    response = await client.put(
        "/api/credentials",
        json={"api_key": api_key, "api_secret": api_secret},
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
    # The key stored while Redis was up (its check against the exchange counts against the
    # shared limiter, in Redis: without it, PUT answers 503).
    async with api_client(get_settings()) as up:
        _, headers = await _user_with_credentials(up, sessions)
    async with api_client(down) as client:
        # The API had read the market snapshot before Redis went away.
        client._transport.app.state.market_cache.remember(snapshot)  # type: ignore[attr-defined]
        # The budgets fail open (service/budgets.py): the position is accepted.
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
    """The sealed-key rotation of the README, while positions execute: (a) the workers open
    with new,old; (b) the API seals for the new public key; (c) `credentials rotate`
    re-seals every row; (d) the old private key is dropped. Nothing is lost on the way."""
    old, new = CREDENTIALS_PAIR, generate_key_pair()
    both = f"{new.private_key},{old.private_key}"
    # (a) Every worker opens with the new key and the old one (a worker needs no public key).
    worker_env = {**service_env, "CREDENTIALS_PRIVATE_KEYS": both, "CREDENTIALS_PUBLIC_KEY": ""}
    workers = [start_worker(worker_env, tmp_path)]
    # The in-process API as deployed: the public key only.
    api_on_old = get_settings().model_copy(update={"credentials_private_keys": None})
    api_on_new = api_on_old.model_copy(update={"credentials_public_key": new.public_key})
    created: list[tuple[ApiUser, httpx.Response]] = []

    async def post(client: httpx.AsyncClient, user: ApiUser) -> None:
        response = await client.post(
            "/api/positions", json={**BODY, "size": "1000"}, headers=user.headers
        )
        assert response.status_code == 202, response.text
        created.append((user, response))

    try:
        async with api_client(api_on_old) as client:  # the API still on the old key
            users = [await funded_trader(sessions, sim, client, balance="100000") for _ in range(2)]
            for user in users:
                await post(client, user)
        # (b) The API's public key becomes the new one (a rolling restart of the API).
        async with api_client(api_on_new) as client:
            users += [
                await funded_trader(sessions, sim, client, balance="100000") for _ in range(2)
            ]
            for user in users:
                await post(client, user)
            # (c) Every row re-sealed for the new key while those execute.
            rotated = await rotate_all(
                sessions,  # type: ignore[arg-type]
                CredentialOpener(parse_private_keys(both)),
            )
            assert rotated.rotated >= 4
            # (d) The old private key dropped: a worker with the new one alone replaces the
            # first (stopped warmly: what it runs finishes).
            worker_env["CREDENTIALS_PRIVATE_KEYS"] = new.private_key
            workers.append(start_worker(worker_env, tmp_path))
            workers[0].stop(timeout=60)
            for user in users:
                await post(client, user)

            async def all_final() -> list[str] | None:
                statuses = [
                    (await client.get(r.headers["Location"], headers=u.headers)).json()["status"]
                    for u, r in created
                ]
                return statuses if all(s in ("ACTIVE", "FAILED") for s in statuses) else None

            statuses = await eventually(all_final, timeout=90, message="all positions final")
            errors = [
                (await client.get(r.headers["Location"], headers=u.headers)).json()["error"]
                for u, r in created
            ]
        assert statuses == ["ACTIVE"] * len(created), errors
        # Every row is now sealed for the new key and opens with it alone (but those no key
        # could open, which the rotation reported and left as they were).
        only_new = CredentialOpener(parse_private_keys(new.private_key))
        async with sessions() as session:  # type: ignore[operator]
            rows = (await session.execute(select(ExchangeCredential))).scalars().all()
        for row in rows:
            if row.user_id not in rotated.unreadable:
                assert row.api_secret_encrypted.startswith(f"nacl1:{new.key_id}:")
                only_new.open(row.api_secret_encrypted)
    finally:
        for worker in workers:
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
