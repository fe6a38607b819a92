"""Redis stopped while positions are posted and executing, then started (empty: it keeps
nothing on disk); PostgreSQL restarted mid-run. The whole service (API, worker, Beat) runs
against a private Redis and a private PostgreSQL so that both can be stopped. Nothing may be
lost or doubled, the API must answer clear 503s for what it cannot do, and everything must
recover by itself."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.db import create_engine, create_session_factory, scope_for
from tests.reliability.helpers import duplicate_links, funded_trader, orders_of
from tests.reliability.report import table, write_section
from tests.reliability.servers import PrivatePostgres, PrivateRedis
from tests.support import (
    ApiUser,
    ServiceProcess,
    eventually,
    free_port,
    prepare_database,
    wait_for_port,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]  # long scenarios

L1 = {"index": "L1", "size": "3000", "direction": "long"}  # 5 legs
PER_PHASE = 10


class Traffic:
    """Every answer the API gave, by phase: nothing may be a 5xx other than a clear 503."""

    def __init__(self, api: httpx.AsyncClient) -> None:
        self.api = api
        self.codes: dict[str, Counter[int]] = {}
        self.unclear: list[str] = []
        self.accepted: dict[str, str] = {}  # position id -> phase

    async def request(self, phase: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self.api.request(method, path, **kwargs)
        except httpx.TransportError as error:  # the API itself must never drop a request
            self.unclear.append(f"{phase} {method} {path}: {error!r}")
            raise
        self.codes.setdefault(phase, Counter())[response.status_code] += 1
        if response.status_code >= 500:
            detail = response.json().get("detail") if response.content else None
            if response.status_code != 503 or not detail:
                self.unclear.append(f"{phase} {method} {path}: {response.status_code}")
        return response

    async def post(self, phase: str, user: ApiUser) -> httpx.Response:
        response = await self.request(
            phase, "POST", "/api/positions", json=L1, headers=user.headers
        )
        if response.status_code == 202:
            self.accepted[response.json()["id"]] = phase
        return response


async def _until(probe: Callable[[], Awaitable[bool]], timeout: float, message: str) -> float:
    started = time.monotonic()
    await eventually(probe, timeout=timeout, interval=0.1, message=message)
    return time.monotonic() - started


@pytest.mark.asyncio
async def test_redis_and_postgres_outages_lose_and_double_nothing(
    service_env: dict[str, str], sim: httpx.AsyncClient, tmp_path: Path
) -> None:
    redis = PrivateRedis()
    postgres = PrivatePostgres()
    processes: list[ServiceProcess] = []
    try:
        redis.start()
        postgres.start()
        database = postgres.url("trader")
        await prepare_database(database)
        env = {
            **service_env,
            "DATABASE_URL": database,
            "REDIS_URL": redis.url(),
            "CELERY_QUEUE": "trades-infra",
            "STALE_PENDING_SECONDS": "2",
            "STALE_EXECUTING_SECONDS": "3",
            "RECOVERY_INTERVAL_SECONDS": "1",
            "MARKET_REFRESH_SECONDS": "2",
        }
        port = free_port()
        processes.append(ServiceProcess(["api", "--port", str(port)], env, tmp_path / "api.log"))
        wait_for_port(port, processes[-1].process)
        processes.append(
            ServiceProcess(
                ["worker", "--pool", "prefork", "--concurrency", "2", "-n", "infra@%h"],
                env,
                tmp_path / "worker.log",
            )
        )
        processes.append(
            ServiceProcess(
                ["beat", "-s", str(tmp_path / "beat-schedule")], env, tmp_path / "beat.log"
            )
        )
        await sim.put("/sim/config", json={"latency_ms": 40, "order_rate_limit": 0})
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=15) as api:
            traffic = Traffic(api)
            engine = create_engine(database, pool_size=1)
            try:
                sessions = scope_for(create_session_factory(engine))
                users = [await funded_trader(sessions, sim, api) for _ in range(3)]
            finally:
                await engine.dispose()

            async def market_ready() -> bool:
                response = await api.post("/api/positions", json=L1, headers=users[0].headers)
                if response.status_code == 202:
                    traffic.accepted[response.json()["id"]] = "start"
                return response.status_code == 202

            await _until(market_ready, 60, "first market snapshot")

            # A: normal traffic, positions executing.
            for n in range(PER_PHASE):
                await traffic.post("normal", users[n % 3])

            # B: Redis stopped while positions are posted and executing.
            redis.stop()
            redis_down = time.monotonic()
            for n in range(PER_PHASE):
                await traffic.post("redis down", users[n % 3])
                some = next(iter(traffic.accepted))
                await traffic.request(
                    "redis down", "GET", f"/api/positions/{some}", headers=users[0].headers
                )
            await asyncio.sleep(max(0.0, 3 - (time.monotonic() - redis_down)))
            redis.start()
            redis_outage = time.monotonic() - redis_down

            # C: PostgreSQL restarted while positions execute; requests keep coming meanwhile.
            for n in range(PER_PHASE):
                await traffic.post("before pg restart", users[n % 3])
            # Down for 3 s (fast shutdown terminates every connection), then up again.
            await asyncio.to_thread(postgres.stop)
            pg_down = time.monotonic()
            while time.monotonic() - pg_down < 3:
                await traffic.post("pg down", users[0])
                await traffic.request("pg down", "GET", "/api/positions", headers=users[1].headers)
                await asyncio.sleep(0.1)
            await asyncio.to_thread(postgres.start)

            async def api_recovered() -> bool:
                response = await traffic.post("pg back", users[2])
                return response.status_code == 202

            pg_recovery = await _until(api_recovered, 30, "API serving again after restart")

            # D: afterwards everything is accepted again, with no operator action.
            after = [await traffic.post("after", users[n % 3]) for n in range(PER_PHASE)]
            assert all(r.status_code == 202 for r in after), [r.status_code for r in after]

            statuses: dict[str, str] = {}

            async def all_final() -> bool:
                for position_id in traffic.accepted:
                    if statuses.get(position_id) in ("ACTIVE", "FAILED"):
                        continue
                    for user in users:
                        r = await api.get(f"/api/positions/{position_id}", headers=user.headers)
                        if r.status_code == 200:
                            statuses[position_id] = r.json()["status"]
                            break
                return all(statuses.get(p) in ("ACTIVE", "FAILED") for p in traffic.accepted)

            settle = await _until(all_final, 240, "every accepted position final")
            orders = await orders_of(sim, users)
    finally:
        await sim.put("/sim/config", json={"latency_ms": 0, "order_rate_limit": 10})
        for process in reversed(processes):
            process.stop()
        redis.close()
        postgres.close()

    outcome = Counter(statuses.values())
    duplicates = duplicate_links(orders)
    phases = ["normal", "redis down", "before pg restart", "pg down", "pg back", "after"]
    code_rows = "\n".join(
        f"| {phase} | "
        + ", ".join(f"{code}: {n}" for code, n in sorted(traffic.codes.get(phase, {}).items()))
        + " |"
        for phase in phases
    )
    body = f"""
Command: `scripts/dev reliability -k outages`. A private Redis (no persistence: a restart
loses every queued message) and a private PostgreSQL (`pg_ctl stop -m fast`: every
connection terminated; down 3 s, then started) on spare ports; API, worker (2 pool
processes) and Beat started against them; simulator latency 40 ms; five-leg positions.
Settings: `STALE_PENDING_SECONDS=2`, `STALE_EXECUTING_SECONDS=3`,
`RECOVERY_INTERVAL_SECONDS=1`.

Phases: normal traffic; Redis stopped for {redis_outage:.1f} s while {PER_PHASE} positions
are posted and others execute, then started empty; PostgreSQL restarted while positions
execute and requests keep arriving; then normal traffic again.

Answers of the API by phase:

| phase | HTTP statuses |
|---|---|
{code_rows}

{
        table(
            [
                ("positions accepted (202)", len(traffic.accepted)),
                ("ended ACTIVE", outcome["ACTIVE"]),
                ("ended FAILED", outcome["FAILED"]),
                (
                    "accepted but lost (not final, or missing)",
                    len(traffic.accepted) - outcome["ACTIVE"] - outcome["FAILED"],
                ),
                ("orders on the exchange (5 legs each)", len(orders)),
                ("extra orders (same orderLinkId twice)", duplicates),
                ("answers that were a 5xx other than a 503 with a message", len(traffic.unclear)),
                ("PostgreSQL back to the API accepting positions again", f"{pg_recovery:.1f} s"),
                ("after the last fault, until every position was final", f"{settle:.1f} s"),
            ]
        )
    }

While Redis is down the API still accepts positions: the row is written (PostgreSQL is up),
the size is checked against the market snapshot kept in memory, and the publish that fails
leaves the position PENDING for the recovery sweep, which sends it once Redis is back (the
messages queued before the outage are gone with it; the sweep re-sends those too). While
PostgreSQL is down, the API answers 503 with a message (and logs
`api.dependency_unavailable`); the first request after it is back succeeds (no pre-ping: the
first disconnect error makes the pool replace every old connection).

Defect found by this scenario and fixed: after Redis restarted empty, every POST was a 503
for about 7 s (until Beat wrote the market snapshot again) although the API held a fresh copy
in memory. The API now serves that copy until its max age (regression tests:
`tests/integration/test_market_cache.py`), and logs every 503 it answers as `api.unavailable`.
"""
    write_section("infrastructure", "Redis and PostgreSQL outages", body)
    assert not traffic.unclear, traffic.unclear
    assert outcome["ACTIVE"] == len(traffic.accepted)
    assert duplicates == 0
    assert len(orders) == 5 * outcome["ACTIVE"]
