"""Test infrastructure: a database of our own on the machine's PostgreSQL (migrated with the
real migrations, dropped at the end), a Redis database number and queue of our own, and the
real processes (simulator, Celery worker, API) started on free loopback ports.

Nothing is faked: no SQLite, no fake Redis, no eager Celery.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from service.devservices import provide
from service.security import generate_key_pair

RUN_ID = uuid.uuid4().hex[:10]
# The run's credentials key pair: the API seals with the public key, the workers (and this
# process, which plays one) open with the private key. The API children get no private key
# (tests/support.py, ServiceProcess).
CREDENTIALS_PAIR = generate_key_pair()
# The machine's PostgreSQL and Redis when they answer (or TEST_PG_HOST / TEST_PG_PORT /
# TEST_REDIS_URL name others), embedded ones started for this run otherwise, or always with
# DEV_SERVICES=embedded; stopped when the run ends (pytest_unconfigure).
_explicit_pg = os.environ.get("TEST_PG_HOST") or os.environ.get("TEST_PG_PORT")
SERVICES = provide(
    "test",
    database_url=(
        f"postgresql://{os.environ.get('TEST_PG_HOST', '127.0.0.1')}:"
        f"{os.environ.get('TEST_PG_PORT', '5432')}"
        if _explicit_pg
        else None
    ),
    redis_url=os.environ.get("TEST_REDIS_URL"),
)
PG_HOST, PG_PORT = SERVICES.postgres[0], str(SERVICES.postgres[1])
TEST_DATABASE = f"trader_test_{RUN_ID}"
TEST_ENV = {
    "DATABASE_URL": f"postgresql+asyncpg://postgres@{PG_HOST}:{PG_PORT}/{TEST_DATABASE}",
    "REDIS_URL": os.environ.get("TEST_REDIS_URL", SERVICES.redis_url(15)),
    "CELERY_QUEUE": f"trades-test-{RUN_ID}",
    "CREDENTIALS_PUBLIC_KEY": CREDENTIALS_PAIR.public_key,
    "CREDENTIALS_PRIVATE_KEYS": CREDENTIALS_PAIR.private_key,
    # No legacy Fernet key (empty counts as unset, and wins over a developer's .env): the
    # legacy scheme has its own tests (tests/unit/test_security.py, test_credentials_sealing).
    "CREDENTIALS_KEYS": "",
    # The workers' market snapshot key: a worker sizes only from a snapshot carrying its MAC
    # (what this process writes as Beat's refresh job passes it too; the API gets none).
    "MARKET_SNAPSHOT_KEY": secrets.token_hex(32),
    "TRADE_RETRY_DELAYS": "0.2,0.4,0.6",
    "LOG_FORMAT": "json",
    "LOG_LEVEL": "INFO",
    "STALE_PENDING_SECONDS": "2",
    "STALE_EXECUTING_SECONDS": "3",
    # A dead database peer found within 2 s, under STALE_EXECUTING_SECONDS (the settings
    # refuse anything else).
    "DB_KEEPALIVE_IDLE_SECONDS": "1",
    "DB_KEEPALIVE_INTERVAL_SECONDS": "1",
    "DB_KEEPALIVE_COUNT": "1",
    "RECOVERY_INTERVAL_SECONDS": "1",
    "TASK_TIME_LIMIT_SECONDS": "60",
    "HTTP_READ_TIMEOUT_SECONDS": "2",
    "WORKER_METRICS_PORT": "0",  # a test that scrapes a worker gives it a port of its own
    # Budgets per user out of the way of tests about something else (a test user opens many
    # positions at once); the budgets' own tests set them small for their API process.
    "USER_REQUESTS_PER_MINUTE": "1000000",
    "USER_REQUEST_BURST": "100000",
    "USER_OPEN_POSITIONS": "100000",
    # In-process apps serve no metrics port of their own (a test that scrapes one gives it a
    # free port), so concurrent runs never share one.
    "API_METRICS_PORT": "0",
}
# The test process reads the same settings as the processes it starts.
os.environ.update(TEST_ENV)
os.environ.setdefault("BYBIT_BASE_URL", "http://127.0.0.1:8999")


def pytest_sessionstart(session: pytest.Session) -> None:
    # One line, whatever the verbosity, saying which servers this run uses.
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(SERVICES.summary())


def pytest_unconfigure() -> None:
    SERVICES.stop()


def _run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A fresh database for this run, migrated by the real migrations, dropped afterwards."""
    import asyncpg

    from service.migrations import ensure_database, upgrade

    url = TEST_ENV["DATABASE_URL"]
    _run(ensure_database(url))
    upgrade(url)
    yield url

    async def drop() -> None:
        connection = await asyncpg.connect(
            host=PG_HOST, port=int(PG_PORT), user="postgres", database="postgres"
        )
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{TEST_DATABASE}" WITH (FORCE)')
        finally:
            await connection.close()

    _run(drop())


@pytest.fixture(scope="session")
def seeded_database(database_url: str) -> str:
    from service.db import create_engine, create_session_factory, scope_for
    from service.seed import seed_indices

    async def seed() -> None:
        engine = create_engine(database_url, pool_size=1)
        try:
            await seed_indices(scope_for(create_session_factory(engine)))
        finally:
            await engine.dispose()

    _run(seed())
    return database_url


@pytest.fixture(scope="session", autouse=True)
def _clean_redis() -> Iterator[None]:
    """Remove this run's keys (our queue and its bookkeeping) from the test Redis db."""
    yield
    import redis

    from tests.support import forget_unacked

    client = redis.Redis.from_url(TEST_ENV["REDIS_URL"])
    try:
        for key in client.scan_iter(match=f"*{TEST_ENV['CELERY_QUEUE']}*"):
            client.delete(key)
        forget_unacked(client, TEST_ENV["CELERY_QUEUE"])
        # Celery's remote-control bindings are shared by every worker on the db: remove them
        # only when nothing else (another run's queue) is left there.
        remaining = list(client.scan_iter(count=1000))
        shared = (b"_kombu.binding", b"unacked")  # bindings, and messages a killed worker held
        if all(key.startswith(shared) for key in remaining):
            for key in remaining:
                client.delete(key)
    except redis.RedisError:
        pass
    finally:
        client.close()


@pytest_asyncio.fixture
async def engine(seeded_database: str) -> AsyncIterator[object]:
    from service.db import create_engine

    engine = create_engine(seeded_database, pool_size=5)
    yield engine
    await engine.dispose()


@pytest_asyncio.fixture
async def sessions(engine: object) -> object:
    from service.db import create_session_factory, scope_for

    return scope_for(create_session_factory(engine))  # type: ignore[arg-type]


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path
