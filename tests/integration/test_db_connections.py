"""Database connections notice a dead peer on both ends, and a statement that hangs fails with
a clear error instead of waiting forever."""

from __future__ import annotations

import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.bybit.client import BybitClient, create_http_session
from service.credentials.service import store_credentials
from service.db import ConnectionHealth, create_engine, create_session_factory, scope_for
from service.execution import ExecutionDeps, Outcome, execute_position
from service.execution.run_lock import advisory_run_lock
from service.market.data import MarketData
from service.positions import repository
from service.users.service import create_user_with_token
from tests.support import worker_opener

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


@pytest_asyncio.fixture
async def impatient_engine(seeded_database: str) -> AsyncIterator[AsyncEngine]:
    health = ConnectionHealth(
        statement_timeout=0.5, keepalive_idle=7, keepalive_interval=3, keepalive_count=2
    )
    engine = create_engine(seeded_database, pool_size=2, health=health)
    yield engine
    await engine.dispose()


async def test_both_ends_keep_alive_and_give_up_on_a_dead_peer(
    impatient_engine: AsyncEngine,
) -> None:
    async with impatient_engine.connect() as connection:
        server = {
            name: (await connection.execute(text(f"SHOW {name}"))).scalar_one()
            for name in (
                "tcp_keepalives_idle",
                "tcp_keepalives_interval",
                "tcp_keepalives_count",
                "tcp_user_timeout",
                "client_connection_check_interval",
            )
        }
        raw = (await connection.get_raw_connection()).driver_connection
        sock = raw._transport.get_extra_info("socket")  # type: ignore[union-attr]
        client = (
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        )
    # The server drops a vanished client (and its locks) after 7 + 3 x 2 = 13 s.
    assert server == {
        "tcp_keepalives_idle": "7",
        "tcp_keepalives_interval": "3",
        "tcp_keepalives_count": "2",
        "tcp_user_timeout": "13000",  # milliseconds
        "client_connection_check_interval": "3s",
    }
    assert client == (1, 7, 3, 2, 13_000)


async def test_a_statement_that_hangs_fails_after_the_timeout(
    impatient_engine: AsyncEngine,
) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with impatient_engine.connect() as connection:
            await connection.execute(text("SELECT pg_sleep(30)"))
    assert time.monotonic() - started < 5


async def test_a_run_whose_database_hangs_stops_with_a_clear_reason(
    impatient_engine: AsyncEngine, engine: AsyncEngine, simulator_url: str
) -> None:
    sessions = scope_for(create_session_factory(impatient_engine))
    cipher = worker_opener()
    async with sessions() as session:
        issued = await create_user_with_token(session, f"db-{secrets.token_hex(5)}@example.com")
        await store_credentials(
            session, cipher, issued.user.id, api_key="K" * 12, api_secret=secrets.token_hex(8)
        )
        position = await repository.add_position(
            session,
            user_id=issued.user.id,
            index_code="BLUECHIP",
            size=Decimal(1000),
            direction="long",
        )
        assert position is not None
    async with create_http_session(connect_timeout=1, read_timeout=1) as http:
        exchange = BybitClient(http, simulator_url)
        deps = ExecutionDeps(
            sessions=sessions,
            run_lock=advisory_run_lock(impatient_engine),
            exchange=exchange,
            market=MarketData(exchange),
            cipher=cipher,
            retry_delays=(0.0,),
        )
        # Another transaction holds the position's row: the claim's UPDATE waits for it.
        async with engine.connect() as blocker:
            await blocker.execute(
                text("SELECT 1 FROM synthetic_positions WHERE id = :id FOR UPDATE"),
                {"id": position.id},
            )
            result = await execute_position(deps, position.id, task_id=str(uuid.uuid4()))
            await blocker.rollback()
    assert result.outcome is Outcome.ABORTED
    assert result.detail == "the database did not answer within DB_STATEMENT_TIMEOUT_SECONDS"
    async with scope_for(create_session_factory(engine))() as session:
        untouched = await repository.get_position(session, position.id)
    assert untouched is not None
    assert untouched.status == "PENDING"  # nothing decided; the sweep sends it again
