"""The fixed cost of one task run in a worker process: the per-process event loop, pooled
database connections and HTTP session reused across tasks (what workers/runtime.py does),
against a fresh loop, engine and session per task (`asyncio.run` per task).

Each run executes the real flow on a position that is already ACTIVE, so it does everything a
run does before the first exchange call (loop entry, run lock on its own connection, the
claim's compare-and-set and the read that discards it) and nothing after.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from decimal import Decimal

import asyncpg

from service.config import Settings
from service.security import generate_key_pair


async def _database(url: str, name: str, *, drop: bool) -> None:
    connection = await asyncpg.connect(host="127.0.0.1", user="postgres", database="postgres")
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if not drop:
            await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()


async def _active_position(url: str) -> uuid.UUID:
    from service.credentials.service import store_credentials
    from service.db import create_engine, create_session_factory, scope_for
    from service.models import PositionStatus
    from service.positions import repository
    from service.security import opener_from_settings
    from service.seed import seed_indices
    from service.users.repository import add_user

    engine = create_engine(url, pool_size=1)
    sessions = scope_for(create_session_factory(engine))
    try:
        await seed_indices(sessions)
        async with sessions() as session:
            user = await add_user(session, f"bench-{uuid.uuid4().hex[:8]}@example.com")
            # A position is only written for a user with credentials stored.
            await store_credentials(
                session,
                opener_from_settings(Settings()),  # seals for the run's key pair
                user.id,
                api_key="BENCHKEY0001",
                api_secret="bench-secret-0001",
            )
            position = await repository.add_position(
                session,
                user_id=user.id,
                index_code="BLUECHIP",
                size=Decimal(1000),
                direction="long",
            )
            assert position is not None
            position.status = PositionStatus.ACTIVE
            return position.id
    finally:
        await engine.dispose()


def _stats(seconds: list[float]) -> tuple[float, float, float]:
    ordered = sorted(seconds)
    return (
        statistics.fmean(ordered) * 1000,
        ordered[len(ordered) // 2] * 1000,
        ordered[int(len(ordered) * 0.99) - 1] * 1000,
    )


def run(*, tasks: int) -> str:
    name = f"trader_bench_{uuid.uuid4().hex[:8]}"
    url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    if not os.environ.get("CREDENTIALS_PRIVATE_KEYS"):
        os.environ["CREDENTIALS_PRIVATE_KEYS"] = generate_key_pair().private_key
    settings = Settings(database_url=url)
    asyncio.run(_database(url, name, drop=False))
    try:
        from service.migrations import upgrade

        upgrade(url)
        position_id = asyncio.run(_active_position(url))

        from service.execution import Outcome, execute_position
        from workers.runtime import Resources, WorkerRuntime

        runtime = WorkerRuntime(settings)
        runtime.run(lambda r, _d: execute_position(r.deps, position_id, task_id="warm-up"))
        reused = []
        for _ in range(tasks):
            started = time.perf_counter()
            result = runtime.run(lambda r, _d: execute_position(r.deps, position_id, task_id="t"))
            reused.append(time.perf_counter() - started)
            assert result.outcome is Outcome.DISCARDED
        runtime.close()

        async def fresh_task() -> None:
            resources = await Resources.open(settings)
            try:
                await execute_position(resources.deps, position_id, task_id="t")
            finally:
                await resources.close()

        fresh = []
        for _ in range(tasks):
            started = time.perf_counter()
            asyncio.run(fresh_task())
            fresh.append(time.perf_counter() - started)
    finally:
        asyncio.run(_database(url, name, drop=True))
    r_mean, r_p50, r_p99 = _stats(reused)
    f_mean, f_p50, f_p99 = _stats(fresh)
    return "\n".join(
        [
            "## Worker: fixed cost of one task run",
            "",
            f"{tasks} runs of the execution flow on an ACTIVE position (everything a run does "
            "before its first exchange call), in one process, PostgreSQL on loopback.",
            "",
            "| resources | runs | mean ms | p50 ms | p99 ms |",
            "|---|---|---|---|---|",
            f"| reused: one loop, pool and HTTP session per process | {tasks} | {r_mean:.2f} | "
            f"{r_p50:.2f} | {r_p99:.2f} |",
            f"| fresh: `asyncio.run`, new engine and session per task | {tasks} | {f_mean:.2f} | "
            f"{f_p50:.2f} | {f_p99:.2f} |",
            "",
            f"The fixed cost of a position's run is **{r_mean:.1f} ms** (goal: at most 15 ms: "
            f"{'met' if r_mean <= 15 else 'not met'}); what a run does besides (its plan, the "
            "writes of every leg, the final transaction) is in the phase table above. "
            f"Reusing them costs **{r_mean / f_mean:.2f}x** the fresh set-up per task "
            f"({f_mean - r_mean:.1f} ms saved on every task), which is why workers/runtime.py "
            "keeps one loop per worker process (created after the fork, closed at shutdown).",
            "",
        ]
    )
