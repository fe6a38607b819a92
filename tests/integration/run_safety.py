"""Scenarios for exactly-once execution under time limits, lost locks and concurrency.

Each runs real worker processes (prefork pool, the real `execute_trade_task`), the simulator
with its latency and fault knobs, and real PostgreSQL and Redis, and returns what it saw; the
integration tests assert on one run of each, `scripts/dev reliability` repeats them and writes
the figures to docs/reliability.md.

What each checks on the exchange's own record (the simulator's journal of calls as they
arrived, and its order list): exactly one order per leg, no order sent after a run's deadline,
and no two runs of one position sending orders at the same time.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select, text

from service.models import ReconciliationIssue, Trade
from service.positions.locks import advisory_lock_key
from service.queue import EXECUTE_TRADE_TASK
from tests.integration.conftest import start_worker
from tests.reliability.helpers import funded_trader
from tests.support import ApiUser, ServiceProcess, eventually

TOP10 = {"index": "TOP10", "size": "5000", "direction": "long"}
BLUECHIP_1000 = {"index": "BLUECHIP", "size": "1000", "direction": "long"}
FINAL = ("ACTIVE", "FAILED")


# ---- what the processes and the exchange saw ---------------------------------------------


def events(process: ServiceProcess, position_id: str) -> list[dict[str, Any]]:
    """The JSON log events of one position, in order, with `ts` as epoch seconds."""
    found = []
    for line in process.output().splitlines():
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        if event.get("position_id") == position_id:
            event["ts"] = datetime.fromisoformat(event["timestamp"]).timestamp()
            found.append(event)
    return found


def attempt_windows(evs: list[dict[str, Any]]) -> dict[int, tuple[float, float]]:
    """First and last event time of each attempt (run) of a position."""
    windows: dict[int, tuple[float, float]] = {}
    for event in evs:
        attempt = event.get("attempt")
        if isinstance(attempt, int):
            start, end = windows.get(attempt, (event["ts"], event["ts"]))
            windows[attempt] = (min(start, event["ts"]), max(end, event["ts"]))
    return windows


def runs_overlap(evs: list[dict[str, Any]]) -> bool:
    """True when an event of an earlier run comes after the first event of a later one: a
    run that went on (a zombie, or a run that lost its lock) while the next one ran."""
    windows = sorted(attempt_windows(evs).items())
    return any(earlier[1][1] > later[1][0] for earlier, later in itertools.pairwise(windows))


async def order_calls(sim: httpx.AsyncClient, user: ApiUser) -> list[dict[str, Any]]:
    """Every order/create the exchange received from the user's key, as it arrived."""
    response = await sim.get(
        "/sim/calls", params={"api_key": user.api_key, "path": "/v5/order/create"}
    )
    return list(response.json()["calls"])


async def orders(sim: httpx.AsyncClient, user: ApiUser) -> list[dict[str, Any]]:
    response = await sim.get("/sim/orders", params={"api_key": user.api_key})
    return list(response.json()["orders"])


def duplicates(order_list: list[dict[str, Any]]) -> int:
    links = [o["orderLinkId"] for o in order_list]
    return len(links) - len(set(links))


async def post(api: httpx.AsyncClient, user: ApiUser, body: dict[str, str]) -> str:
    response = await api.post("/api/positions", json=body, headers=user.headers)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def final(
    api: httpx.AsyncClient, user: ApiUser, position_id: str, timeout: float = 90
) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        body = (await api.get(f"/api/positions/{position_id}", headers=user.headers)).json()
        return body if body["status"] in FINAL else None

    return await eventually(probe, timeout=timeout, interval=0.1, message="a final status")


async def send_copies(position_id: str, queue: str, copies: int) -> None:
    """Copies of the position's task sent by Celery itself, beside the API's own message."""
    from celery_app import app as celery_app

    await asyncio.gather(
        *(
            asyncio.to_thread(
                celery_app.send_task, EXECUTE_TRADE_TASK, args=[position_id], queue=queue
            )
            for _ in range(copies)
        )
    )


async def fault(sim: httpx.AsyncClient, user: ApiUser, **spec: object) -> None:
    response = await sim.post("/sim/faults", json={**spec, "api_key": user.api_key})
    response.raise_for_status()


def beat(env: dict[str, str], tmp_path: Path) -> ServiceProcess:
    name = uuid.uuid4().hex[:6]
    return ServiceProcess(
        ["beat", "-s", str(tmp_path / f"beat-{name}")], env, tmp_path / f"beat-{name}.log"
    )


# ---- 1. the run's deadline, and Celery's soft limit ---------------------------------------


@dataclass
class DeadlineRun:
    status: str
    attempts: int
    orders: int
    duplicates: int
    deadline_passes: int  # run.deadline_passed events
    drained: int  # run.drained events (the soft-limit variant)
    late_orders: int  # orders sent after their run's deadline (or soft limit)
    runs_overlap: bool
    seconds_to_final: float


async def deadline_scenario(
    api: httpx.AsyncClient,
    sim: httpx.AsyncClient,
    sessions: object,
    service_env: dict[str, str],
    tmp_path: Path,
    *,
    soft_limit: bool,
) -> DeadlineRun:
    """A ten-leg basket whose fill reads turn slow, on a worker whose runs have 7.5 s
    (TASK_TIME_LIMIT_SECONDS=10). `soft_limit`: the task is sent with a soft limit of 3 s
    instead, so Celery's fires first, while the run awaits the exchange (billiard raises it
    from a signal handler, outside the run's coroutine); Beat's sweep then resumes it."""
    env = {**service_env, "TASK_TIME_LIMIT_SECONDS": "10"}
    user = await funded_trader(sessions, sim, api)
    if soft_limit:
        limit = 3.0
        # Fill reads of 1.5 s: the soft limit lands in the second leg's read.
        await fault(sim, user, path="/v5/order/realtime", kind="delay", delay_ms=1500, times=2)
    else:
        limit = 0.75 * 10
        # Two slow fill reads, then three that hang past the client's timeout: the third
        # leg's read (retried by tenacity, about 3.3 s to 9.6 s into the run) is under way
        # when the deadline comes at 7.5 s.
        await fault(sim, user, path="/v5/order/realtime", kind="delay", delay_ms=1500, times=2)
        await fault(
            sim, user, path="/v5/order/realtime", kind="hang", delay_ms=5000, skip=2, times=3
        )
    worker = start_worker(env, tmp_path)
    sweeper = beat(env, tmp_path) if soft_limit else None
    try:
        started = time.monotonic()
        if soft_limit:
            position_id = await _enqueue_with_soft_limit(sessions, user, env, limit)
        else:
            position_id = await post(api, user, TOP10)
        body = await final(api, user, position_id)
        took = time.monotonic() - started
    finally:
        worker.stop()
        if sweeper is not None:
            sweeper.stop()
    evs = events(worker, position_id)
    windows = attempt_windows(evs)
    placed = await orders(sim, user)
    submitted = {
        e["order_link_id"]: e for e in evs if e["event"] == "leg.submitted" and "attempt" in e
    }
    arrivals = {c["order_link_id"]: c["arrived_ms"] / 1000 for c in await order_calls(sim, user)}
    late = 0
    for link, arrived in arrivals.items():
        event = submitted.get(link)
        run_start = windows[event["attempt"]][0] if event else None
        # The run started a moment before its first event; a second of slack for that.
        if run_start is None or arrived > run_start + limit:
            late += 1
    names = [e["event"] for e in evs]
    drained = worker.output().count('"event": "run.drained"')
    return DeadlineRun(
        status=body["status"],
        attempts=body["attempts"],
        orders=len(placed),
        duplicates=duplicates(placed),
        deadline_passes=names.count("run.deadline_passed"),
        drained=drained,
        late_orders=late,
        runs_overlap=runs_overlap(evs),
        seconds_to_final=took,
    )


async def _enqueue_with_soft_limit(
    sessions: Any, user: ApiUser, env: dict[str, str], soft_limit: float
) -> str:
    """What the API does (a PENDING row, then the task), with the task's own soft limit."""
    from celery_app import app as celery_app
    from service.positions.repository import add_position
    from service.users.repository import get_user_by_email

    async with sessions() as session:
        owner = await get_user_by_email(session, user.email)
        assert owner is not None
        position = await add_position(
            session,
            user_id=owner.id,
            index_code=TOP10["index"],
            size=Decimal(TOP10["size"]),
            direction=TOP10["direction"],
        )
        assert position is not None
    celery_app.send_task(
        EXECUTE_TRADE_TASK,
        args=[str(position.id)],
        queue=env["CELERY_QUEUE"],
        soft_time_limit=soft_limit,
    )
    return str(position.id)


# ---- 2. the lock's connection is lost mid-run -----------------------------------------------


@dataclass
class LostLockRun:
    status: str
    orders: int
    duplicates: int
    refused_duplicates: int  # leg.duplicate_order_link_id: a leg re-sent that Bybit refused
    ownership_lost: int
    terminated: bool
    orders_after_loss: int  # orders the first run sent after its lock connection was cut
    # (half a second after: an order proven just before the cut may arrive a moment later)
    runs_overlap: bool
    orders_overlap: bool  # an order of the first run arrived after one of the second
    seconds_to_final: float


async def _lock_holder(sessions: Any, position_id: uuid.UUID) -> int | None:
    key = advisory_lock_key(position_id)
    async with sessions() as session:
        result = await session.execute(
            text(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND objsubid = 1 AND classid::bigint = :high AND objid::bigint = :low"
            ),
            {"high": (key >> 32) & 0xFFFFFFFF, "low": key & 0xFFFFFFFF},
        )
        return result.scalar_one_or_none()


async def _trade_count(sessions: Any, position_id: uuid.UUID) -> int:
    async with sessions() as session:
        result = await session.execute(
            select(func.count(Trade.id)).where(Trade.position_id == position_id)
        )
        return int(result.scalar_one())


async def lost_lock_scenario(
    api: httpx.AsyncClient,
    sim: httpx.AsyncClient,
    sessions: Any,
    service_env: dict[str, str],
    tmp_path: Path,
) -> LostLockRun:
    """Two legs into a ten-leg basket, the connection holding the run's lock is terminated
    (`pg_terminate_backend`, as a failover or a network cut would). The run must stop before
    its next order; Beat's sweep resumes the position once the run is silent."""
    user = await funded_trader(sessions, sim, api)
    await fault(sim, user, path="/v5/order/realtime", kind="delay", delay_ms=300, times=None)
    worker = start_worker(service_env, tmp_path)
    sweeper = beat(service_env, tmp_path)
    try:
        started = time.monotonic()
        position_id = await post(api, user, TOP10)
        position_uuid = uuid.UUID(position_id)

        async def two_legs_filled() -> bool:
            return await _trade_count(sessions, position_uuid) >= 2

        await eventually(two_legs_filled, timeout=60, interval=0.02, message="two fills")
        holder = await _lock_holder(sessions, position_uuid)
        terminated = False
        if holder is not None:
            async with sessions() as session:  # type: ignore[operator]
                terminated = bool(
                    (
                        await session.execute(
                            text("SELECT pg_terminate_backend(:pid)"), {"pid": holder}
                        )
                    ).scalar_one()
                )
        # An order proven just before the cut may still arrive a moment after it; one that
        # arrives later was sent without proof.
        cut_at = time.time() + 0.5
        body = await final(api, user, position_id)
        took = time.monotonic() - started
    finally:
        worker.stop()
        sweeper.stop()
    evs = events(worker, position_id)
    placed = await orders(sim, user)
    by_attempt: dict[int, list[float]] = {}
    arrivals = {c["order_link_id"]: c["arrived_ms"] / 1000 for c in await order_calls(sim, user)}
    for event in evs:
        if event["event"] == "leg.submitted" and event["order_link_id"] in arrivals:
            by_attempt.setdefault(event["attempt"], []).append(arrivals[event["order_link_id"]])
    spans = [by_attempt[a] for a in sorted(by_attempt)]
    after_loss = sum(1 for arrived in by_attempt.get(1, []) if arrived > cut_at)
    orders_overlap = any(max(earlier) > min(later) for earlier, later in itertools.pairwise(spans))
    names = [e["event"] for e in evs]
    return LostLockRun(
        status=body["status"],
        orders=len(placed),
        duplicates=duplicates(placed),
        refused_duplicates=names.count("leg.duplicate_order_link_id"),
        ownership_lost=names.count("position.ownership_lost"),
        terminated=terminated,
        orders_after_loss=after_loss,
        runs_overlap=runs_overlap(evs),
        orders_overlap=orders_overlap,
        seconds_to_final=took,
    )


# ---- 3. two baskets of one account --------------------------------------------------------


@dataclass
class SharedAccountRun:
    statuses: list[str]
    errors: list[str | None]
    orders_by_position: dict[str, int]
    interleaved: bool  # orders of the two baskets mixed in time
    waited: int  # position.waiting_for_account events
    seen_waiting: bool  # GET showed waiting_for_account while it waited
    attempts: list[int]


async def shared_account_scenario(
    api: httpx.AsyncClient,
    sim: httpx.AsyncClient,
    sessions: Any,
    service_env: dict[str, str],
    tmp_path: Path,
    *,
    balance: str,
) -> SharedAccountRun:
    """Two BLUECHIP 1,000 baskets of one account posted together to a worker with two pool
    processes. With 1,500 USDT only one basket can be held; with more, both."""
    user = await funded_trader(sessions, sim, api, balance=balance)
    # Each exchange call of this account takes 100 ms, so the two runs overlap in time.
    await fault(sim, user, path="/v5/order/create", kind="delay", delay_ms=100, times=None)
    await fault(sim, user, path="/v5/order/realtime", kind="delay", delay_ms=100, times=None)
    worker = start_worker(service_env, tmp_path)
    seen_waiting = False

    async def watch(position_ids: list[str]) -> list[dict[str, Any]] | None:
        # Both are read on every poll: the one that waits may be either, and its wait ends
        # when the other is final.
        nonlocal seen_waiting
        found = [
            (await api.get(f"/api/positions/{i}", headers=user.headers)).json()
            for i in position_ids
        ]
        seen_waiting = seen_waiting or any(b["waiting_for_account"] for b in found)
        return found if all(b["status"] in FINAL for b in found) else None

    try:
        ids = await asyncio.gather(post(api, user, BLUECHIP_1000), post(api, user, BLUECHIP_1000))
        bodies = await eventually(
            lambda: watch(ids), timeout=90, interval=0.02, message="final statuses"
        )
    finally:
        worker.stop()
    placed = await orders(sim, user)
    owner = {f"{uuid.UUID(i).hex}": i for i in ids}
    sequence = [owner[o["orderLinkId"].rsplit("-", 1)[0]] for o in placed]
    switches = sum(1 for a, b in itertools.pairwise(sequence) if a != b)
    waited = sum(
        1
        for position_id in ids
        for e in events(worker, position_id)
        if e["event"] == "position.waiting_for_account"
    )
    return SharedAccountRun(
        statuses=[b["status"] for b in bodies],
        errors=[b["error"] for b in bodies],
        orders_by_position={i: sequence.count(i) for i in ids},
        interleaved=switches > 1,
        waited=waited,
        seen_waiting=seen_waiting,
        attempts=[b["attempts"] for b in bodies],
    )


# ---- 4. reconciliation of a run that died after a fill --------------------------------------


@dataclass
class DeadRunReconciliation:
    status_when_reconciled: str
    orders_on_exchange: int
    trades_before: int
    trades_after: int
    issues: list[str] = field(default_factory=list)
    mismatch_logged: bool = False


async def dead_run_reconciliation_scenario(
    api: httpx.AsyncClient,
    sim: httpx.AsyncClient,
    sessions: Any,
    service_env: dict[str, str],
    tmp_path: Path,
) -> DeadRunReconciliation:
    """A worker SIGKILLed after the exchange filled a leg and before the fill was recorded
    (the fill read hangs), no Beat to resume it: the position stays EXECUTING with a fill the
    books lack. Reconciliation, run as the Beat job on a new worker, must report it."""
    env = {**service_env, "RECONCILE_SETTLE_SECONDS": "0"}
    user = await funded_trader(sessions, sim, api)
    await fault(sim, user, path="/v5/order/realtime", kind="hang", delay_ms=30000, times=None)
    worker = start_worker(env, tmp_path)
    try:
        position_id = await post(api, user, BLUECHIP_1000)

        async def first_order_filled() -> bool:
            return len(await orders(sim, user)) >= 1

        await eventually(first_order_filled, timeout=60, interval=0.02, message="an order")
    finally:
        worker.kill()
    await sim.delete("/sim/faults")
    position_uuid = uuid.UUID(position_id)
    status = (await api.get(f"/api/positions/{position_id}", headers=user.headers)).json()["status"]
    before = await _trade_count(sessions, position_uuid)
    reconciler = start_worker(env, tmp_path)
    try:
        from celery_app import app as celery_app

        celery_app.send_task("workers.maintenance.reconcile_positions", queue=env["CELERY_QUEUE"])

        async def reported() -> list[str] | None:
            async with sessions() as session:
                kinds = (
                    await session.execute(
                        select(ReconciliationIssue.kind).where(
                            ReconciliationIssue.position_id == position_uuid
                        )
                    )
                ).scalars()
                found = list(kinds)
            return found or None

        issues = await eventually(reported, timeout=60, interval=0.1, message="a report")
    finally:
        reconciler.stop()
    logged = any(
        e["event"] == "reconciliation.mismatch" and e.get("position_status") == "EXECUTING"
        for e in events(reconciler, position_id)
    )
    return DeadRunReconciliation(
        status_when_reconciled=status,
        orders_on_exchange=len(await orders(sim, user)),
        trades_before=before,
        trades_after=await _trade_count(sessions, position_uuid),
        issues=issues,
        mismatch_logged=logged,
    )
