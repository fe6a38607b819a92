"""A private stack for one benchmark run: its own database on the machine's PostgreSQL, its own
Redis database number and queue, the simulator, and the API and workers as real processes,
all on loopback. Everything it creates is removed when the run ends."""

from __future__ import annotations

import asyncio
import os
import secrets
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from service.security import generate_key_pair
from tests.support import (
    ApiUser,
    ServiceProcess,
    forget_unacked,
    free_port,
    prepare_database,
    wait_for_port,
)

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")


@dataclass
class Stack:
    env: dict[str, str]
    database_url: str
    simulator_url: str
    queue: str
    tmp: Path
    processes: list[ServiceProcess] = field(default_factory=list)

    def start(self, name: str, *args: str, module: str = "service") -> ServiceProcess:
        process = ServiceProcess(list(args), self.env, self.tmp / f"{name}.log", module=module)
        self.processes.append(process)
        return process

    def start_api(self, *, app: str = "service.api:create_app") -> tuple[ServiceProcess, str]:
        port = free_port()
        process = self.start(f"api-{port}", "api", "--port", str(port), "--app", app)
        wait_for_port(port, process.process)
        return process, f"http://127.0.0.1:{port}"

    def start_worker(self, *, processes: int) -> ServiceProcess:
        name = f"bench-{secrets.token_hex(3)}"
        return self.start(
            name, "worker", "--pool", "prefork", "--concurrency", str(processes), "-n", f"{name}@%h"
        )

    def configure_simulator(self, **config: object) -> None:
        httpx.put(f"{self.simulator_url}/sim/config", json=config).raise_for_status()

    def new_user(self, *, balance: str = "1000000000") -> ApiUser:
        return asyncio.run(self._new_user(balance))

    async def _new_user(self, balance: str) -> ApiUser:
        from service.config import Settings
        from service.credentials.service import store_credentials
        from service.db import create_engine, create_session_factory
        from service.security import opener_from_settings
        from service.users.service import authenticate, create_user_with_token

        email = f"bench-{secrets.token_hex(6)}@example.com"
        api_key, api_secret = f"BN{secrets.token_hex(8).upper()}", secrets.token_hex(16)
        httpx.post(
            f"{self.simulator_url}/sim/accounts",
            json={"api_key": api_key, "api_secret": api_secret, "balance": balance},
        ).raise_for_status()
        settings = Settings(database_url=self.database_url)
        engine = create_engine(self.database_url, pool_size=1)
        try:
            async with create_session_factory(engine)() as session:
                issued = await create_user_with_token(session, email)
                user = await authenticate(session, issued.token)
                await store_credentials(
                    session,
                    opener_from_settings(settings),  # seals for the stack's key pair
                    user.id,
                    api_key=api_key,
                    api_secret=api_secret,
                )
                await session.commit()
        finally:
            await engine.dispose()
        return ApiUser(email, issued.token, api_key, api_secret, user_id=user.id)

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()


async def _drop_database(name: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(host="127.0.0.1", user="postgres", database="postgres")
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


async def warm_market(stack: Stack) -> None:
    """What Beat's refresh job does: filters and prices of every catalogue symbol in Redis."""
    import redis.asyncio as aioredis
    from pydantic import SecretStr

    from service.bybit.client import BybitClient, create_http_session
    from service.db import create_engine, create_session_factory, scope_for
    from service.market.data import MarketData
    from service.market.refresh import refresh_market_cache
    from service.market.snapshot import MarketCache

    engine = create_engine(stack.database_url, pool_size=1)
    redis = aioredis.from_url(REDIS_URL)
    try:
        async with create_http_session(connect_timeout=2, read_timeout=5) as http:
            await refresh_market_cache(
                scope_for(create_session_factory(engine)),
                MarketData(BybitClient(http, stack.simulator_url)),
                # Signed with the stack's MARKET_SNAPSHOT_KEY, as its workers' refresh job does.
                MarketCache(
                    redis,
                    max_age_seconds=24 * 3600,
                    secret=SecretStr(stack.env["MARKET_SNAPSHOT_KEY"]),
                ),
            )
    finally:
        await redis.aclose()
        await engine.dispose()


def _clean_redis(queue: str) -> None:
    import redis

    from service.market.snapshot import CACHE_KEY, MAC_SUFFIX

    client = redis.Redis.from_url(REDIS_URL)
    try:
        for key in [*client.scan_iter(match=f"*{queue}*"), CACHE_KEY, CACHE_KEY + MAC_SUFFIX]:
            client.delete(key)
        forget_unacked(client, queue)
        remaining = list(client.scan_iter(count=1000))
        if all(key.startswith((b"_kombu.binding", b"unacked")) for key in remaining):
            for key in remaining:
                client.delete(key)
    finally:
        client.close()


def _key_pair_env() -> dict[str, str]:
    pair = generate_key_pair()
    return {
        "CREDENTIALS_PUBLIC_KEY": pair.public_key,
        "CREDENTIALS_PRIVATE_KEYS": pair.private_key,
        "CREDENTIALS_KEYS": "",
    }


@contextmanager
def bench_stack(**settings: str) -> Iterator[Stack]:
    run_id = uuid.uuid4().hex[:8]
    name = f"trader_bench_{run_id}"
    url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    queue = f"trades-bench-{run_id}"
    with tempfile.TemporaryDirectory(prefix="trader-bench-") as tmp:
        sim_port = free_port()
        env = dict(os.environ)
        env.update(
            {
                "DATABASE_URL": url,
                "REDIS_URL": REDIS_URL,
                "CELERY_QUEUE": queue,
                # The API child gets the public key only (tests/support.py, role_env).
                **_key_pair_env(),
                # The workers' alone (the API child is denied it, as the deployment does).
                "MARKET_SNAPSHOT_KEY": secrets.token_hex(32),
                "BYBIT_BASE_URL": f"http://127.0.0.1:{sim_port}",
                "LOG_FORMAT": "json",
                "LOG_LEVEL": "INFO",
                "WORKER_METRICS_PORT": "0",
                # No Beat here to refresh the snapshot; the simulator's prices do not move, so
                # the one written at the start stays fresh for the API and the workers.
                "MARKET_MAX_AGE_SECONDS": "86400",
                "MARKET_REFRESH_SECONDS": "43200",
                # The benchmarks drive one user's requests as fast as the API answers: budgets
                # per user out of their way (the load test of docs/reliability.md measures them).
                "USER_REQUESTS_PER_MINUTE": "100000000",
                "USER_REQUEST_BURST": "1000000",
                "USER_OPEN_POSITIONS": "100000000",
                **settings,
            }
        )
        # This process reads the same settings as the ones it starts.
        saved = dict(os.environ)
        os.environ.update(env)
        from service.config import get_settings

        get_settings.cache_clear()
        stack = Stack(env, url, f"http://127.0.0.1:{sim_port}", queue, Path(tmp))
        try:
            # The benchmark's own clients (the floor run, the load) share no limiter: no IP
            # limit here; the egress figure sets one itself.
            simulator = stack.start(
                "simulator", "simulator", "--port", str(sim_port), "--ip-limit", "0"
            )
            wait_for_port(sim_port, simulator.process)
            stack.configure_simulator(order_rate_limit=0, latency_ms=0)
            asyncio.run(prepare_database(url))
            asyncio.run(warm_market(stack))
            yield stack
        finally:
            stack.stop_all()
            asyncio.run(_drop_database(name))
            _clean_redis(queue)
            os.environ.clear()
            os.environ.update(saved)
            get_settings.cache_clear()
