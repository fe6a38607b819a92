"""Issue 22: tokens expire and are revoked one by one; a PENDING position can be cancelled (by
its owner over HTTP, or with every PENDING position of a revoked user), and a cancelled
position is never run, re-sent by the sweep, or reconciled."""

from __future__ import annotations

import asyncio
import secrets
import uuid

import httpx
import pytest
from sqlalchemy import text

from service.config import get_settings
from service.credentials.service import store_credentials
from service.db import SessionScope
from service.execution import ExecutionDeps, Outcome, execute_position
from service.execution.recovery import recover_stale_positions
from service.models import PositionStatus, SyntheticPosition
from service.positions import repository
from service.positions.service import cancel_pending
from service.users.repository import get_user_by_email
from tests.integration.conftest import new_user, pending_position
from tests.support import run_command, worker_opener

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

BODY = {"index": "BLUECHIP", "size": "1000", "direction": "long"}


async def _user_with_credentials(
    client: httpx.AsyncClient, sessions: SessionScope
) -> tuple[str, dict[str, str]]:
    """A user with a token and a key stored (straight in the database, as a worker seals it:
    PUT /api/credentials would ask the exchange about the key first)."""
    email, token = await new_user(sessions)
    async with sessions() as session:
        user = await get_user_by_email(session, email)
        assert user is not None
        await store_credentials(
            session,
            worker_opener(),
            user.id,
            api_key="KEY" + secrets.token_hex(6),
            api_secret=secrets.token_hex(16),
        )
    return email, {"Authorization": f"Bearer {token}"}


async def _status(sessions: SessionScope, position_id: uuid.UUID) -> SyntheticPosition:
    async with sessions() as session:
        position = await repository.get_position(session, position_id)
    assert position is not None
    return position


async def _expire_tokens(sessions: SessionScope, email: str) -> None:
    async with sessions() as session:
        await session.execute(
            text(
                "UPDATE api_tokens SET expires_at = now() - interval '1 second' "
                "WHERE user_id = (SELECT id FROM users WHERE email = :email)"
            ),
            {"email": email},
        )


# --- Cancelling over HTTP ------------------------------------------------------------------


async def test_a_pending_position_is_cancelled_once_and_a_repeat_answers_the_same(
    client: httpx.AsyncClient, sessions: SessionScope
) -> None:
    _, headers = await _user_with_credentials(client, sessions)
    created = await client.post("/api/positions", json=BODY, headers=headers)
    assert created.status_code == 202
    url = created.headers["Location"]

    cancelled = await client.post(f"{url}/cancel", headers=headers)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "CANCELLED"
    assert cancelled.json()["attempts"] == 0
    again = await client.post(f"{url}/cancel", headers=headers)
    assert again.status_code == 200
    assert again.json()["status"] == "CANCELLED"
    assert again.json()["updated_at"] == cancelled.json()["updated_at"]  # nothing written

    shown = await client.get(url, headers=headers)
    assert shown.json()["status"] == "CANCELLED"
    listed = await client.get("/api/positions", params={"status": "CANCELLED"}, headers=headers)
    assert [p["id"] for p in listed.json()["items"]] == [created.json()["id"]]
    pending = await client.get("/api/positions", params={"status": "PENDING"}, headers=headers)
    assert pending.json()["items"] == []
    # Final: it cannot be closed either.
    closed = await client.post(f"{url}/close", headers=headers)
    assert closed.status_code == 409


async def test_cancel_answers_404_401_and_409_as_documented(
    client: httpx.AsyncClient, sessions: SessionScope
) -> None:
    _, headers = await _user_with_credentials(client, sessions)
    _, stranger = await _user_with_credentials(client, sessions)
    created = await client.post("/api/positions", json=BODY, headers=headers)
    url = created.headers["Location"]

    theirs = await client.post(f"{url}/cancel", headers=stranger)
    assert theirs.status_code == 404
    assert "not found" in theirs.json()["detail"]
    unknown = await client.post(f"/api/positions/{uuid.uuid4()}/cancel", headers=headers)
    assert unknown.status_code == 404
    anonymous = await client.post(f"{url}/cancel")
    assert anonymous.status_code == 401
    malformed = await client.post("/api/positions/not-a-uuid/cancel", headers=headers)
    assert malformed.status_code == 422

    # A worker claimed it: too late to cancel; nothing written.
    async with sessions() as session:
        await session.execute(
            text(
                "UPDATE synthetic_positions SET status = 'EXECUTING', claim = 'a-task' "
                "WHERE id = :id"
            ),
            {"id": uuid.UUID(created.json()["id"])},
        )
    claimed = await client.post(f"{url}/cancel", headers=headers)
    assert claimed.status_code == 409
    assert "claimed" in claimed.json()["detail"]
    assert (await client.get(url, headers=headers)).json()["status"] == "EXECUTING"


# --- Against the worker and the sweep --------------------------------------------------------


async def test_a_cancel_racing_a_worker_s_claim_has_exactly_one_winner(
    unreachable_deps: ExecutionDeps, sessions: SessionScope
) -> None:
    outcomes: set[str] = set()
    for round_ in range(12):
        position_id = await pending_position(sessions, unreachable_deps.cipher)
        run, cancelled = await asyncio.gather(
            execute_position(unreachable_deps, position_id, task_id=f"task-{round_}"),
            cancel_pending(sessions, position_id),
        )
        position = await _status(sessions, position_id)
        if cancelled is not None:
            # The cancel won: the run took nothing (no claim, no attempt).
            assert position.status == PositionStatus.CANCELLED
            assert run.outcome is Outcome.DISCARDED
            assert position.claim is None
            assert position.attempts == 0
            outcomes.add("cancel")
        else:
            assert position.status == PositionStatus.EXECUTING
            assert position.claim == f"task-{round_}"
            assert run.outcome is Outcome.RETRY
            outcomes.add("claim")
    assert outcomes  # each round had exactly one winner (either may win any round)


async def test_the_worker_discards_a_cancelled_position_and_the_sweep_never_resends_it(
    unreachable_deps: ExecutionDeps, sessions: SessionScope
) -> None:
    position_id = await pending_position(sessions, unreachable_deps.cipher)
    assert await cancel_pending(sessions, position_id) is not None
    # A copy of its task still in the queue arrives: discarded, nothing taken.
    run = await execute_position(unreachable_deps, position_id, task_id="late-copy")
    assert run.outcome is Outcome.DISCARDED
    assert run.detail == "CANCELLED"
    position = await _status(sessions, position_id)
    assert position.status == PositionStatus.CANCELLED
    assert position.claim is None

    # Long past the staleness limits: still never re-sent (nor resumed, nor failed).
    async with sessions() as session:
        await session.execute(
            text(
                "UPDATE synthetic_positions SET updated_at = now() - interval '1 hour', "
                "heartbeat_at = now() - interval '1 hour' WHERE id = :id"
            ),
            {"id": position_id},
        )
    sent: list[uuid.UUID] = []

    class Publisher:
        async def publish(
            self, position_id: uuid.UUID, *, task_id: str | None = None, task: str = ""
        ) -> None:
            sent.append(position_id)

    report = await recover_stale_positions(
        sessions, Publisher(), stale_pending_seconds=1, stale_executing_seconds=1, max_runs=5
    )
    assert position_id not in sent
    assert position_id not in report.failed
    assert (await _status(sessions, position_id)).status == PositionStatus.CANCELLED


# --- Tokens ---------------------------------------------------------------------------------


async def test_an_expired_token_is_refused_on_every_path(
    client: httpx.AsyncClient, sessions: SessionScope
) -> None:
    email, headers = await _user_with_credentials(client, sessions)
    created = await client.post("/api/positions", json=BODY, headers=headers)
    url = created.headers["Location"]
    polled = await client.get(url, headers=headers)
    assert polled.status_code == 200  # rendered: the hot path could now serve it from memory
    tag = polled.headers["ETag"]

    await _expire_tokens(sessions, email)
    for method, path, body, extra in (
        ("POST", "/api/positions", BODY, {}),  # the one-statement insert
        ("GET", url, None, {}),  # the one-statement poll (a rendered body)
        ("GET", url, None, {"If-None-Match": tag}),  # ... and its 304
        ("GET", "/api/positions", None, {}),
        ("POST", f"{url}/cancel", None, {}),
        ("POST", f"{url}/close", None, {}),
        ("GET", "/api/credentials", None, {}),
    ):
        answer = await client.request(method, path, json=body, headers={**headers, **extra})
        assert answer.status_code == 401, (method, path, answer.status_code)
        assert answer.json()["detail"].startswith("token expired"), (method, path)
    listed = await client.get("/api/positions", headers=headers)
    assert listed.status_code == 401
    # Nothing was written with it.
    async with sessions() as session:
        count = await session.execute(
            text(
                "SELECT count(*) FROM synthetic_positions p JOIN users u ON u.id = p.user_id "
                "WHERE u.email = :email"
            ),
            {"email": email},
        )
    assert count.scalar_one() == 1


async def test_a_new_token_expires_after_the_configured_ttl(sessions: SessionScope) -> None:
    from service.users.service import create_user_with_token

    async with sessions() as session:
        issued = await create_user_with_token(
            session, f"ttl-{secrets.token_hex(4)}@example.com", ttl_seconds=3600
        )
        row = await session.execute(
            text("SELECT expires_at - created_at FROM api_tokens WHERE id = :id"),
            {"id": issued.token_id},
        )
    lifetime = row.scalar_one()
    assert abs(lifetime.total_seconds() - 3600) < 5
    default = get_settings().token_ttl_seconds
    async with sessions() as session:
        again = await create_user_with_token(session, issued.user.email)
    assert abs((again.expires_at - issued.expires_at).total_seconds() - (default - 3600)) < 60


async def test_tokens_are_listed_and_revoked_one_by_one_from_the_command_line(
    client: httpx.AsyncClient, sessions: SessionScope, service_env: dict[str, str]
) -> None:
    email = f"cli-{secrets.token_hex(4)}@example.com"
    first = run_command(service_env, "users", "create", email).stdout.strip().splitlines()[-1]
    second = run_command(service_env, "users", "create", email).stdout.strip().splitlines()[-1]

    listing = run_command(service_env, "users", "tokens", email).stdout
    rows = [line.split() for line in listing.strip().splitlines()[1:]]
    assert len(rows) == 2
    assert all(row[3] == "-" for row in rows)  # none revoked
    # Never the token or its hash.
    from service.security import hash_token

    for secret in (first, second, hash_token(first), hash_token(second)):
        assert secret not in listing

    revoked = run_command(service_env, "users", "revoke-token", rows[0][0])
    assert "revoked" in revoked.stdout
    after = run_command(service_env, "users", "tokens", email).stdout
    states = {line.split()[0]: line.split()[3] for line in after.strip().splitlines()[1:]}
    assert states[rows[0][0]] != "-"
    assert states[rows[1][0]] == "-"
    # The first token (oldest, listed first) no longer works; the second still does.
    gone = await client.get("/api/positions", headers={"Authorization": f"Bearer {first}"})
    assert gone.status_code == 401
    live = await client.get("/api/positions", headers={"Authorization": f"Bearer {second}"})
    assert live.status_code == 200

    with pytest.raises(Exception) as missing:  # noqa: PT011 - CalledProcessError, exit 2
        run_command(service_env, "users", "revoke-token", str(uuid.uuid4()))
    assert "not found" in missing.value.stderr  # type: ignore[attr-defined]


async def test_revoke_with_cancel_pending_cancels_what_the_token_queued(
    client: httpx.AsyncClient, sessions: SessionScope, service_env: dict[str, str]
) -> None:
    email, headers = await _user_with_credentials(client, sessions)
    queued = [
        (await client.post("/api/positions", json=BODY, headers=headers)).json()["id"]
        for _ in range(3)
    ]
    # One was claimed by a worker already: left to its run.
    async with sessions() as session:
        await session.execute(
            text("UPDATE synthetic_positions SET status = 'EXECUTING' WHERE id = :id"),
            {"id": uuid.UUID(queued[0])},
        )
    result = run_command(service_env, "users", "revoke", email, "--cancel-pending")
    assert "revoked 1 token(s)" in result.stdout
    assert "cancelled 2 PENDING position(s)" in result.stdout
    statuses = [(await _status(sessions, uuid.UUID(p))).status for p in queued]
    assert statuses == ["EXECUTING", "CANCELLED", "CANCELLED"]
    refused = await client.get("/api/positions", headers=headers)
    assert refused.status_code == 401

    # Without the flag, revocation leaves PENDING positions as they are (as before).
    other, other_headers = await _user_with_credentials(client, sessions)
    kept = (await client.post("/api/positions", json=BODY, headers=other_headers)).json()["id"]
    plain = run_command(service_env, "users", "revoke", other)
    assert "cancelled" not in plain.stdout
    assert (await _status(sessions, uuid.UUID(kept))).status == PositionStatus.PENDING


async def test_a_user_lists_and_revokes_their_own_tokens_over_http(
    client: httpx.AsyncClient, sessions: SessionScope
) -> None:
    from service.users.service import create_user_with_token

    email, first = await new_user(sessions)
    async with sessions() as session:
        second = (await create_user_with_token(session, email)).token
    headers = {"Authorization": f"Bearer {first}"}
    listed = await client.get("/api/tokens", headers=headers)
    assert listed.status_code == 200
    tokens = listed.json()
    assert len(tokens) == 2
    assert set(tokens[0]) == {"id", "created_at", "expires_at", "revoked_at"}
    for secret in (first, second):
        assert secret not in listed.text

    # Revoke the second (newest) with the first: the first still works, the second not.
    revoked = await client.delete(f"/api/tokens/{tokens[1]['id']}", headers=headers)
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] is not None
    again = await client.delete(f"/api/tokens/{tokens[1]['id']}", headers=headers)
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]
    assert (
        await client.get("/api/tokens", headers={"Authorization": f"Bearer {second}"})
    ).status_code == 401
    # Another user's token is as absent as a missing one.
    _, stranger = await new_user(sessions)
    theirs = await client.delete(
        f"/api/tokens/{tokens[0]['id']}", headers={"Authorization": f"Bearer {stranger}"}
    )
    assert theirs.status_code == 404
    assert (await client.get("/api/tokens", headers=headers)).status_code == 200
    assert (await client.get("/api/tokens")).status_code == 401
