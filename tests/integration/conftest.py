from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from service.api import create_app
from service.config import Settings, get_settings
from tests.conftest import TEST_ENV
from tests.support import ApiUser, ServiceProcess, free_port, wait_for_port, worker_opener

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture
async def redis() -> AsyncIterator[aioredis.Redis]:
    """A client of the tests' own Redis database (the broker's and the limiter's)."""
    client = aioredis.from_url(TEST_ENV["REDIS_URL"])
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def simulator_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Bybit V5 simulator as a real process on a free loopback port.

    Without its IP limit: the test process's own clients (the fixtures, runs awaited
    in-process) do not go through the workers' shared limiter, and a session of tests sends
    more than 600 requests in five seconds. The tests of the IP limit set it themselves."""
    port = free_port()
    log = tmp_path_factory.mktemp("simulator") / "simulator.log"
    process = ServiceProcess(
        ["simulator", "--port", str(port), "--ip-limit", "0"], dict(os.environ), log
    )
    try:
        wait_for_port(port, process.process)
        url = f"http://127.0.0.1:{port}"
        # The exchange of the apps run in-process too (PUT /api/credentials asks it what a
        # key may do), as of the processes the tests start (service_env).
        os.environ["BYBIT_BASE_URL"] = url
        get_settings.cache_clear()
        yield url
    finally:
        process.stop()


async def refresh_market(sessions: object, simulator_url: str) -> None:
    """What Beat's refresh job does: the simulator's filters, prices and mark prices in the
    Redis cache (tests that move a price call it again)."""
    import redis.asyncio as aioredis

    from service.bybit.client import BybitClient, create_http_session
    from service.market.data import MarketData
    from service.market.refresh import refresh_market_cache
    from service.market.snapshot import MarketCache

    redis = aioredis.from_url(TEST_ENV["REDIS_URL"])
    try:
        async with create_http_session(connect_timeout=2, read_timeout=5) as http:
            await refresh_market_cache(
                sessions,  # type: ignore[arg-type]
                MarketData(BybitClient(http, simulator_url)),
                # Signed with the workers' key, as the refresh job (a worker) signs it.
                MarketCache(redis, max_age_seconds=600, secret=get_settings().market_snapshot_key),
            )
    finally:
        await redis.aclose()


@pytest_asyncio.fixture(autouse=True)
async def warm_market(simulator_url: str, sessions: object) -> AsyncIterator[None]:
    import redis.asyncio as aioredis

    from service.market.snapshot import CACHE_KEY, MAC_SUFFIX

    await refresh_market(sessions, simulator_url)
    try:
        yield
    finally:
        redis = aioredis.from_url(TEST_ENV["REDIS_URL"])
        await redis.delete(CACHE_KEY, CACHE_KEY + MAC_SUFFIX)
        await redis.aclose()


@pytest.fixture(scope="session")
def service_env(seeded_database: str, simulator_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(TEST_ENV)
    env["DATABASE_URL"] = seeded_database
    env["BYBIT_BASE_URL"] = simulator_url
    return env


def start_worker(env: dict[str, str], log_dir: Path, *extra: str) -> ServiceProcess:
    name = f"worker-{secrets.token_hex(3)}"
    return ServiceProcess(
        ["worker", "--pool", "prefork", "--concurrency", "2", "-n", f"{name}@%h", *extra],
        env,
        log_dir / f"{name}.log",
    )


@pytest.fixture
def worker(service_env: dict[str, str], tmp_path: Path) -> Iterator[ServiceProcess]:
    process = start_worker(service_env, tmp_path)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def api_url(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The API served by uvicorn in its own process, as in production."""
    port = free_port()
    log = tmp_path_factory.mktemp("api") / "api.log"
    process = ServiceProcess(["api", "--port", str(port)], service_env, log)
    try:
        wait_for_port(port, process.process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop()


@asynccontextmanager
async def api_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app in-process (httpx over ASGI) with its lifespan: real database and broker. As
    deployed, it is given no key that opens stored credentials (this process holds one: it
    plays the worker too), unless `settings` has no public key to seal with (legacy)."""
    if settings.credentials_public_key:
        update = {"credentials_private_keys": None, "credentials_keys": None}
        settings = settings.model_copy(update=update)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            yield http


@pytest_asyncio.fixture
async def api(seeded_database: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app in-process, on the seeded test database."""
    async with api_client(get_settings()) as client:
        yield client


@pytest_asyncio.fixture
async def client(api: httpx.AsyncClient) -> httpx.AsyncClient:
    """`api` under the name the API tests use."""
    return api


async def new_user(sessions: object) -> tuple[str, str]:
    from service.users.service import create_user_with_token

    email = f"user-{secrets.token_hex(6)}@example.com"
    async with sessions() as session:  # type: ignore[operator]
        issued = await create_user_with_token(session, email)
    return email, issued.token


async def funded_trader(
    sessions: object, sim: httpx.AsyncClient, api: httpx.AsyncClient, balance: str = "10000000"
) -> ApiUser:
    """A new user with a token, a funded simulator account and its credentials stored."""
    email, token = await new_user(sessions)
    user = ApiUser(
        email=email,
        token=token,
        api_key=f"RL{secrets.token_hex(8).upper()}",
        api_secret=secrets.token_hex(16),
    )
    response = await sim.post(
        "/sim/accounts",
        json={"api_key": user.api_key, "api_secret": user.api_secret, "balance": balance},
    )
    response.raise_for_status()
    response = await api.put(
        "/api/credentials",
        json={"api_key": user.api_key, "api_secret": user.api_secret},
        headers=user.headers,
    )
    assert response.status_code == 200, response.text
    return user


@pytest_asyncio.fixture
async def unreachable_deps(engine: Any, sessions: Any) -> AsyncIterator[Any]:
    """Deps whose exchange refuses every connection: a transient error on every call."""
    async with execution_deps(
        engine,
        sessions,
        f"http://127.0.0.1:{free_port()}",
        connect_timeout=1,
        read_timeout=1,
        retry_delays=(0.0, 0.0, 0.0),
        call_attempts=2,
        call_wait_max=0.01,
    ) as deps:
        yield deps


async def pending_position(
    sessions: object,
    sealer: Any,
    *,
    api_key: str = "K" * 12,
    api_secret: str | None = None,
) -> uuid.UUID:
    """A new user with a stored key (sealed with `sealer`) and one PENDING BLUECHIP position
    of 1000 USDT, written directly: no API, no task sent."""
    from service.credentials.service import store_credentials
    from service.positions import repository
    from service.users.service import create_user_with_token

    async with sessions() as session:  # type: ignore[operator]
        issued = await create_user_with_token(session, f"user-{secrets.token_hex(6)}@example.com")
        await store_credentials(
            session,
            sealer,
            issued.user.id,
            api_key=api_key,
            api_secret=api_secret or secrets.token_hex(8),
        )
        position = await repository.add_position(
            session,
            user_id=issued.user.id,
            index_code="BLUECHIP",
            size=Decimal("1000"),
            direction="long",
        )
        assert position is not None
    return position.id


@pytest_asyncio.fixture
async def sim(simulator_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=simulator_url, timeout=10) as client:
        yield client


@pytest_asyncio.fixture
async def funded_user(sessions: object, sim: httpx.AsyncClient) -> ApiUser:
    """A user with a token and a funded simulator account, credentials not yet stored."""
    email, token = await new_user(sessions)
    api_key, api_secret = f"TK{secrets.token_hex(8).upper()}", secrets.token_hex(16)
    response = await sim.post(
        "/sim/accounts", json={"api_key": api_key, "api_secret": api_secret, "balance": "1000000"}
    )
    response.raise_for_status()
    return ApiUser(email=email, token=token, api_key=api_key, api_secret=api_secret)


@asynccontextmanager
async def execution_deps(
    engine: object,
    sessions: object,
    base_url: str,
    *,
    as_a_worker: bool = False,
    connect_timeout: float = 2,
    read_timeout: float = 5,
    **options: Any,
) -> AsyncIterator[Any]:
    """ExecutionDeps for a run awaited in-process against `base_url`. `as_a_worker`: with
    what a worker has besides, the shared rate limits (under a prefix of the test's own) and
    market data from the shared snapshot."""
    import redis.asyncio as aioredis

    from service.bybit.client import BybitClient, create_http_session
    from service.execution import ExecutionDeps
    from service.execution.run_lock import advisory_run_lock
    from service.market.data import MarketData
    from service.market.snapshot import MarketCache
    from service.rate_limits import RedisCallGate

    redis = aioredis.from_url(TEST_ENV["REDIS_URL"])
    try:
        async with create_http_session(
            connect_timeout=connect_timeout, read_timeout=read_timeout
        ) as http:
            gate = RedisCallGate(redis, prefix=f"test-limits-{secrets.token_hex(4)}")
            exchange = BybitClient(http, base_url, gate=gate if as_a_worker else None)
            cache = MarketCache(
                redis, max_age_seconds=600, secret=get_settings().market_snapshot_key
            )
            snapshot = cache.load if as_a_worker else None
            yield ExecutionDeps(
                sessions=sessions,  # type: ignore[arg-type]
                run_lock=advisory_run_lock(engine),  # type: ignore[arg-type]
                exchange=exchange,
                market=MarketData(exchange, snapshot=snapshot),
                cipher=worker_opener(),
                **{"retry_delays": (0.0,), **options},
            )
    finally:
        await redis.aclose()
