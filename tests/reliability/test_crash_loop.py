"""Workers SIGKILLed at random points of live baskets, opening and closing: every position
still ends ACTIVE or FAILED (CLOSED when it was being closed), no order is placed twice, none
is left behind. Run with `scripts/dev reliability`;
the figures go to docs/reliability.md.

The kill points are random on purpose (before, during and right after orders), so the sleep
before each kill is the scenario, not a timing assumption; every wait for an outcome polls
with a deadline.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.config import get_settings
from tests.integration.conftest import api_client, start_worker
from tests.reliability.helpers import FINAL, funded_trader, wait_final
from tests.reliability.report import table, write_section
from tests.support import ApiUser, ServiceProcess, eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]  # long scenarios

ROUNDS = int(os.environ.get("CRASH_ROUNDS", "10"))
PER_ROUND = int(os.environ.get("CRASH_POSITIONS", "5"))
BASKET = {"index": "TOP10", "size": "5000", "direction": "long"}


async def _statuses(api: httpx.AsyncClient, user: ApiUser, ids: list[str]) -> list[str]:
    return [
        (await api.get(f"/api/positions/{i}", headers=user.headers)).json()["status"] for i in ids
    ]


async def _all_in(
    api: httpx.AsyncClient, user: ApiUser, ids: list[str], statuses: tuple[str, ...], what: str
) -> list[str]:
    """Poll until every position is in one of `statuses`; their statuses then."""

    async def probe() -> list[str] | None:
        now = await _statuses(api, user, ids)
        return now if all(s in statuses for s in now) else None

    return await eventually(probe, timeout=120, interval=0.2, message=what)


@dataclass
class _Kill:
    replacement: ServiceProcess
    final: list[str]
    caught: int  # positions still in the run's status when the worker was killed
    recovery: float  # seconds from the kill to every position final


async def _kill_and_recover(
    rng: random.Random,
    worker: ServiceProcess,
    api: httpx.AsyncClient,
    user: ApiUser,
    ids: list[str],
    running: str,
    finals: tuple[str, ...],
    env: dict[str, str],
    tmp_path: Path,
    round_number: int,
) -> _Kill:
    """SIGKILL the worker's process group at a random point 0 to 1.5 s from now, start a new
    worker, and wait (with Beat's sweep) until every position is in `finals`."""
    await asyncio.sleep(rng.uniform(0.0, 1.5))
    worker.kill()
    killed_at = time.monotonic()
    caught = (await _statuses(api, user, ids)).count(running)
    replacement = start_worker(env, tmp_path)
    try:
        final = await _all_in(api, user, ids, finals, f"round {round_number}")
    finally:
        replacement.stop()
    return _Kill(replacement, final, caught, time.monotonic() - killed_at)


async def _orders(sim: httpx.AsyncClient, user: ApiUser) -> list[dict[str, Any]]:
    response = await sim.get("/sim/orders", params={"api_key": user.api_key})
    return list(response.json()["orders"])


@pytest.mark.asyncio
@pytest.mark.parametrize("execution", ["sequential", "batch"])
async def test_random_worker_kills_lose_and_double_nothing(
    execution: str,
    service_env: dict[str, str],
    sim: httpx.AsyncClient,
    sessions: object,
    tmp_path: Path,
) -> None:
    basket = {**BASKET, "execution": execution}
    rng = random.Random(int(os.environ.get("CRASH_SEED", "20261124")))
    # Exchange round trips of 50 ms, so a kill lands inside a basket, not between baskets.
    await sim.put("/sim/config", json={"latency_ms": 50, "order_rate_limit": 0})
    beat = ServiceProcess(
        ["beat", "-s", str(tmp_path / "beat-schedule")], service_env, tmp_path / "beat.log"
    )
    outcomes: Counter[str] = Counter()
    duplicates = 0
    resent = 0
    waits = 0
    orders_placed = 0
    recoveries: list[float] = []
    kills_mid_basket = 0
    try:
        async with api_client(get_settings()) as api:
            for round_number in range(ROUNDS):
                user = await funded_trader(sessions, sim, api)
                worker = start_worker(service_env, tmp_path)
                ids = []
                for _ in range(PER_ROUND):
                    response = await api.post("/api/positions", json=basket, headers=user.headers)
                    assert response.status_code == 202, response.text
                    ids.append(response.json()["id"])

                async def started(
                    api: httpx.AsyncClient = api, ids: list[str] = ids, user: ApiUser = user
                ) -> bool:
                    first = await api.get(f"/api/positions/{ids[0]}", headers=user.headers)
                    return bool(first.json()["status"] != "PENDING")

                # From the moment the worker runs its first basket, a random kill point.
                await eventually(started, timeout=60, interval=0.02, message="worker started")
                kill = await _kill_and_recover(
                    rng,
                    worker,
                    api,
                    user,
                    ids,
                    "EXECUTING",
                    FINAL,
                    service_env,
                    tmp_path,
                    round_number,
                )
                replacement, final = kill.replacement, kill.final
                kills_mid_basket += kill.caught
                # Bybit's duplicate refusal is the second line of defence: count every time
                # it was needed (a leg re-sent that the lookup should have found).
                resent += sum(
                    p.output().count('"event": "leg.duplicate_order_link_id"')
                    for p in (worker, replacement)
                )
                # The round's baskets share one account: they run one at a time.
                waits += sum(
                    p.output().count('"event": "position.waiting_for_account"')
                    for p in (worker, replacement)
                )
                recoveries.append(kill.recovery)
                outcomes.update(final)
                orders = await _orders(sim, user)
                links = [o["orderLinkId"] for o in orders]
                duplicates += len(links) - len(set(links))
                orders_placed += len(links)
    finally:
        beat.stop()
        await sim.put("/sim/config", json={"latency_ms": 0, "order_rate_limit": 10})

    total = ROUNDS * PER_ROUND
    _write_report(
        execution,
        total,
        outcomes,
        duplicates,
        resent,
        orders_placed,
        kills_mid_basket,
        recoveries,
        waits,
    )
    assert duplicates == 0
    assert resent == 0
    assert orders_placed == 10 * outcomes["ACTIVE"]
    assert sum(outcomes.values()) == total
    assert outcomes["ACTIVE"] == total  # a crash is not a reason to fail a basket


def _write_report(
    execution: str,
    total: int,
    outcomes: Counter[str],
    duplicates: int,
    resent: int,
    orders_placed: int,
    kills_mid_basket: int,
    recoveries: list[float],
    waits: int,
) -> None:
    batch = execution == "batch"
    how = (
        'with `"execution": "batch"` (every leg\'s order in one create-batch request, then '
        "every fill read at once)"
        if batch
        else "sequential (one order after another)"
    )
    body = f"""
Command: `scripts/dev reliability -k crash` (`CRASH_ROUNDS={ROUNDS} CRASH_POSITIONS={PER_ROUND}`).
Settings: `STALE_EXECUTING_SECONDS=3`, `RECOVERY_INTERVAL_SECONDS=1`, simulator latency 50 ms.

{ROUNDS} rounds; each posts {PER_ROUND} ten-leg baskets, {how}, of one account to a worker (2 pool
processes), kills the worker's whole process group with SIGKILL at a random point 0 to 1.5 s
after it started its first basket (before, during or right after an order), starts a new
worker, and lets Beat's recovery sweep resume what the dead one held. The baskets of one
account run one at a time, so every kill lands on a run holding the account's lock (and
usually on another waiting for it): PostgreSQL releases both locks with the dead connections.

{
        table(
            [
                ("positions", total),
                ("still EXECUTING when the worker was killed", kills_mid_basket),
                ("waits for the account (`position.waiting_for_account`)", waits),
                ("ended ACTIVE", outcomes["ACTIVE"]),
                ("ended FAILED", outcomes["FAILED"]),
                ("left PENDING or EXECUTING", total - outcomes["ACTIVE"] - outcomes["FAILED"]),
                ("orders on the exchange (10 legs each)", orders_placed),
                ("orders placed twice (same orderLinkId)", duplicates),
                ("legs re-sent and refused by Bybit as duplicates", resent),
                ("kill to all final, median", f"{sorted(recoveries)[len(recoveries) // 2]:.1f} s"),
                ("kill to all final, worst", f"{max(recoveries):.1f} s"),
            ]
        )
    }

Recovery time is dominated by `STALE_EXECUTING_SECONDS` (a dead run is recognised only after
its heartbeat is that old and its run lock is free); with the defaults (60 s, sweep every
20 s) a killed position resumes within about 80 s.
"""
    if batch:
        write_section("crashes-batch", "Workers SIGKILLed at random points: batch execution", body)
    else:
        write_section("crashes", "Workers SIGKILLed at random points", body)


@pytest.mark.asyncio
async def test_random_worker_kills_during_closes_lose_and_double_nothing(
    service_env: dict[str, str], sim: httpx.AsyncClient, sessions: object, tmp_path: Path
) -> None:
    """The same, with the kill inside the closes: each round opens its baskets, closes them
    all at once and kills the worker at a random point of the closes."""
    rng = random.Random(int(os.environ.get("CRASH_SEED", "20261129")))
    await sim.put("/sim/config", json={"latency_ms": 50, "order_rate_limit": 0})
    beat = ServiceProcess(
        ["beat", "-s", str(tmp_path / "beat-schedule")], service_env, tmp_path / "beat.log"
    )
    outcomes: Counter[str] = Counter()
    duplicates = closes_placed = left_on_exchange = kills_mid_close = 0
    recoveries: list[float] = []
    try:
        async with api_client(get_settings()) as api:
            for round_number in range(ROUNDS):
                user = await funded_trader(sessions, sim, api)
                opener = start_worker(service_env, tmp_path)
                try:
                    ids = []
                    for _ in range(PER_ROUND):
                        response = await api.post(
                            "/api/positions", json=BASKET, headers=user.headers
                        )
                        assert response.status_code == 202, response.text
                        ids.append(response.json()["id"])
                    opened = await wait_final(api, dict.fromkeys(ids, user), timeout=120)
                finally:
                    opener.stop()
                assert all(p["status"] == "ACTIVE" for p in opened.values())
                for position_id in ids:
                    response = await api.post(
                        f"/api/positions/{position_id}/close", headers=user.headers
                    )
                    assert response.status_code == 202, response.text
                worker = start_worker(service_env, tmp_path)

                async def closing_started(
                    api: httpx.AsyncClient = api, ids: list[str] = ids, user: ApiUser = user
                ) -> bool:
                    first = await api.get(f"/api/positions/{ids[0]}", headers=user.headers)
                    return bool(first.json()["attempts"] > 0)

                await eventually(
                    closing_started, timeout=60, interval=0.02, message="closing started"
                )
                kill = await _kill_and_recover(
                    rng,
                    worker,
                    api,
                    user,
                    ids,
                    "CLOSING",
                    ("CLOSED", "CLOSE_FAILED"),
                    service_env,
                    tmp_path,
                    round_number,
                )
                kills_mid_close += kill.caught
                recoveries.append(kill.recovery)
                outcomes.update(kill.final)
                orders = await _orders(sim, user)
                links = [o["orderLinkId"] for o in orders]
                duplicates += len(links) - len(set(links))
                closes_placed += sum(1 for o in orders if o["reduceOnly"])
                held = (await sim.get(f"/sim/accounts/{user.api_key}/positions")).json()
                left_on_exchange += len(held["positions"])
    finally:
        beat.stop()
        await sim.put("/sim/config", json={"latency_ms": 0, "order_rate_limit": 10})

    total = ROUNDS * PER_ROUND
    stuck = total - outcomes["CLOSED"] - outcomes["CLOSE_FAILED"]
    write_section(
        "crashes-closing",
        "Workers SIGKILLed at random points of closes",
        f"""
Command: `scripts/dev reliability -k crash` (`CRASH_ROUNDS={ROUNDS} CRASH_POSITIONS={PER_ROUND}`).
Settings as above.

{ROUNDS} rounds; each opens {PER_ROUND} ten-leg baskets of one account (no kill), then posts a
close for every one of them, kills the worker's process group with SIGKILL at a random point
0 to 1.5 s after the first close was claimed, starts a new worker, and lets the recovery sweep
resume the closes the dead one held (each looks up every order of its round by orderLinkId
before sending anything).

{
            table(
                [
                    ("positions closed", total),
                    ("still CLOSING when the worker was killed", kills_mid_close),
                    ("ended CLOSED", outcomes["CLOSED"]),
                    ("ended CLOSE_FAILED", outcomes["CLOSE_FAILED"]),
                    ("left CLOSING (stuck)", stuck),
                    ("reduce-only orders on the exchange (10 legs each)", closes_placed),
                    ("orders placed twice (same orderLinkId)", duplicates),
                    ("positions left open on the exchange after the closes", left_on_exchange),
                    (
                        "kill to all closed, median",
                        f"{sorted(recoveries)[len(recoveries) // 2]:.1f} s",
                    ),
                    ("kill to all closed, worst", f"{max(recoveries):.1f} s"),
                ]
            )
        }
""",
    )
    assert duplicates == 0
    assert stuck == 0
    assert outcomes["CLOSED"] == total
    assert closes_placed == 10 * total
    assert left_on_exchange == 0
