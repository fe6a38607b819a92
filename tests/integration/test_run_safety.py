"""Exactly once under time limits, lost locks and concurrency: one run of each scenario of
tests/integration/run_safety.py (real prefork workers, Beat, the simulator, PostgreSQL and
Redis), asserted on the exchange's own record. `scripts/dev reliability` repeats them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration import run_safety

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


async def test_a_run_stops_at_its_deadline_and_the_next_attempt_finishes(
    api: httpx.AsyncClient,
    sim: httpx.AsyncClient,
    sessions: Any,
    service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    run = await run_safety.deadline_scenario(
        api, sim, sessions, service_env, tmp_path, soft_limit=False
    )
    assert run.status == "ACTIVE"
    assert run.deadline_passes == 1
    assert run.attempts == 2
    assert run.late_orders == 0
    assert not run.runs_overlap  # the first run did nothing once the second began
    assert (run.orders, run.duplicates) == (10, 0)


async def test_a_soft_time_limit_leaves_no_zombie_run(
    api: httpx.AsyncClient,
    sim: httpx.AsyncClient,
    sessions: Any,
    service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    run = await run_safety.deadline_scenario(
        api, sim, sessions, service_env, tmp_path, soft_limit=True
    )
    # The interrupted run was cancelled and drained at once; its locks were released, so the
    # sweep resumed the position without waiting for that pool process to run another task.
    assert run.drained >= 1
    assert run.status == "ACTIVE"
    assert run.late_orders == 0
    assert not run.runs_overlap
    assert (run.orders, run.duplicates) == (10, 0)


async def test_a_run_that_lost_its_lock_connection_places_nothing_more(
    api: httpx.AsyncClient,
    sim: httpx.AsyncClient,
    sessions: Any,
    service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    run = await run_safety.lost_lock_scenario(api, sim, sessions, service_env, tmp_path)
    assert run.terminated
    assert run.ownership_lost == 1
    assert run.orders_after_loss == 0
    assert run.status == "ACTIVE"
    assert not run.orders_overlap  # no two runs sent orders for the position at once
    assert not run.runs_overlap
    assert (run.orders, run.duplicates, run.refused_duplicates) == (10, 0, 0)


async def test_two_baskets_of_one_account_run_one_after_the_other(
    api: httpx.AsyncClient,
    sim: httpx.AsyncClient,
    sessions: Any,
    service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    # 1,500 USDT covers one basket of 1,000 at 1x, not two.
    run = await run_safety.shared_account_scenario(
        api, sim, sessions, service_env, tmp_path, balance="1500"
    )
    assert sorted(run.statuses) == ["ACTIVE", "FAILED"]
    failed = run.statuses.index("FAILED")
    error = run.errors[failed] or ""
    assert error.startswith("pre-flight: available balance"), error
    ids = list(run.orders_by_position)
    assert run.orders_by_position[ids[failed]] == 0  # refused before its first order
    assert run.orders_by_position[ids[1 - failed]] == 2
    assert run.waited >= 1
    assert run.seen_waiting  # GET showed it: waiting_for_account
    assert run.attempts == [1, 1]  # waiting used no attempt

    # Enough for both: both held, one after the other.
    run = await run_safety.shared_account_scenario(
        api, sim, sessions, service_env, tmp_path, balance="5000"
    )
    assert run.statuses == ["ACTIVE", "ACTIVE"]
    assert not run.interleaved
    assert list(run.orders_by_position.values()) == [2, 2]


async def test_reconciliation_reports_a_fill_a_dead_run_left_unrecorded(
    api: httpx.AsyncClient,
    sim: httpx.AsyncClient,
    sessions: Any,
    service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    run = await run_safety.dead_run_reconciliation_scenario(
        api, sim, sessions, service_env, tmp_path
    )
    assert run.status_when_reconciled == "EXECUTING"
    assert run.orders_on_exchange == 1
    assert (run.trades_before, run.trades_after) == (0, 1)  # recorded from the exchange
    assert run.issues == ["missing_fill"]
    assert run.mismatch_logged
