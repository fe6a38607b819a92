"""The deployment's database roles (deploy/postgres-init/10-roles.sh, run by compose's
PostgreSQL on a new data directory): the migrations run as the schema's owner, and the
application's role, with which every other process connects, reads and writes rows and can
do nothing else. Run here against a database and roles of its own, then dropped."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from service.migrations import upgrade
from tests.conftest import PG_HOST, PG_PORT

pytestmark = [pytest.mark.integration]

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "postgres-init" / "10-roles.sh"


async def _admin(statement: str) -> None:
    connection = await asyncpg.connect(
        host=PG_HOST, port=int(PG_PORT), user="postgres", database="postgres"
    )
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture
def roles() -> Iterator[dict[str, str]]:
    suffix = secrets.token_hex(4)
    names = {
        "database": f"trader_roles_{suffix}",
        "owner": f"trader_owner_{suffix}",
        "app": f"trader_app_{suffix}",
        "owner_password": secrets.token_hex(16),
        "app_password": secrets.token_hex(16),
    }
    asyncio.run(_admin(f'CREATE DATABASE "{names["database"]}"'))
    try:
        yield names
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{names["database"]}" WITH (FORCE)'))
        for role in (names["app"], names["owner"]):
            asyncio.run(_admin(f'DROP ROLE IF EXISTS "{role}"'))


def _url(names: dict[str, str], role: str) -> str:
    password = names[f"{role}_password"]
    return f"postgresql+asyncpg://{names[role]}:{password}@{PG_HOST}:{PG_PORT}/{names['database']}"


def test_migrations_run_as_the_owner_and_the_application_role_only_touches_rows(
    roles: dict[str, str],
) -> None:
    subprocess.run(
        ["sh", str(SCRIPT)],
        env={
            **os.environ,
            "PGHOST": PG_HOST,
            "PGPORT": str(PG_PORT),
            "POSTGRES_USER": "postgres",
            "POSTGRES_DB": roles["database"],
            "TRADER_OWNER_ROLE": roles["owner"],
            "TRADER_APP_ROLE": roles["app"],
            "TRADER_OWNER_PASSWORD": roles["owner_password"],
            "TRADER_APP_PASSWORD": roles["app_password"],
        },
        check=True,
        capture_output=True,
        timeout=60,
    )
    upgrade(_url(roles, "owner"))
    asyncio.run(_as_the_application(roles))


async def _as_the_application(roles: dict[str, str]) -> None:
    from service.db import create_engine, create_session_factory, scope_for
    from service.seed import seed_indices
    from service.users.service import authenticate, create_user_with_token

    engine = create_engine(_url(roles, "app"), pool_size=1)
    try:
        sessions = scope_for(create_session_factory(engine))
        assert await seed_indices(sessions) > 0
        async with sessions() as session:
            issued = await create_user_with_token(session, "roles@example.com")
        async with sessions() as session:
            assert (await authenticate(session, issued.token)).email == "roles@example.com"
    finally:
        await engine.dispose()

    connection = await asyncpg.connect(
        host=PG_HOST,
        port=int(PG_PORT),
        user=roles["app"],
        password=roles["app_password"],
        database=roles["database"],
    )
    try:
        assert not await connection.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = user")
        owned = await connection.fetchval(
            "SELECT count(*) FROM pg_class WHERE relowner = (SELECT oid FROM pg_roles "
            "WHERE rolname = current_user)"
        )
        assert owned == 0
        for statement in (
            "CREATE TABLE intruder (id int)",
            "DROP TABLE api_tokens",
            "ALTER TABLE api_tokens DROP COLUMN expires_at",
            "ALTER TABLE synthetic_positions DISABLE TRIGGER ALL",
            "TRUNCATE api_tokens",
            "CREATE FUNCTION intruder() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await connection.execute(statement)
    finally:
        await connection.close()
