"""The exactly-once scenarios of tests/integration/run_safety.py, repeated, with their figures
written to docs/reliability.md (one section per case). Run with
`scripts/dev reliability -k run_safety` (`RUN_SAFETY_ROUNDS`, default 5)."""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration import run_safety
from tests.reliability.report import table, write_section

pytestmark = [pytest.mark.integration, pytest.mark.asyncio, pytest.mark.timeout(1800)]

ROUNDS = int(os.environ.get("RUN_SAFETY_ROUNDS", "5"))
COMMAND = "`scripts/dev reliability -k run_safety`"


def _seconds(values: list[float]) -> str:
    return f"median {statistics.median(values):.1f} s, worst {max(values):.1f} s"


async def test_run_safety_deadline(
    api: httpx.AsyncClient,
    sim: httpx.AsyncClient,
    sessions: Any,
    service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    for soft_limit in (False, True):
        runs = [
            await run_safety.deadline_scenario(
                api, sim, sessions, service_env, tmp_path, soft_limit=soft_limit
            )
            for _ in range(ROUNDS)
        ]
        rows: list[tuple[str, object]] = [
            ("positions (ten legs each)", len(runs)),
            ("ended ACTIVE", sum(r.status == "ACTIVE" for r in runs)),
            ("orders on the exchange", sum(r.orders for r in runs)),
            ("orders placed twice (same orderLinkId)", sum(r.duplicates for r in runs)),
            (
                "orders sent after their run's " + ("soft limit" if soft_limit else "deadline"),
                sum(r.late_orders for r in runs),
            ),
            ("a run acting after the next run began", sum(r.runs_overlap for r in runs)),
            ("POST to ACTIVE", _seconds([r.seconds_to_final for r in runs])),
        ]
        if soft_limit:
            rows.insert(
                5, ("runs cancelled and drained off the loop", sum(r.drained for r in runs))
            )
            body = f"""
Command: {COMMAND} (`RUN_SAFETY_ROUNDS={ROUNDS}`). Settings: `TASK_TIME_LIMIT_SECONDS=10`,
the task sent with a soft limit of 3 s, `STALE_EXECUTING_SECONDS=3`, Beat running.

A ten-leg basket whose first two fill reads take 1.5 s each, so Celery's soft limit fires while
the run awaits the exchange. billiard raises it from a signal handler: it leaves
`run_until_complete`, not the run's coroutine. The runtime then cancels and drains every task
on the loop before the process takes another message (the run's locks are released on the
way), and Beat's sweep resumes the position, looking every sent leg up. Before this, the run
stayed pending on the loop holding its lock, the sweep skipped it, and its remaining legs went
out whenever that process next ran a task.

{table(rows)}
"""
            write_section("soft-limit", "Celery's soft time limit mid-run: no zombie run", body)
        else:
            rows.insert(
                4, ("runs that reached their deadline", sum(r.deadline_passes for r in runs))
            )
            rows.insert(5, ("attempts per position", _counts([r.attempts for r in runs])))
            body = f"""
Command: {COMMAND} (`RUN_SAFETY_ROUNDS={ROUNDS}`). Settings: `TASK_TIME_LIMIT_SECONDS=10`
(the run's deadline at 7.5 s), `HTTP_READ_TIMEOUT_SECONDS=2`.

A ten-leg basket whose fill reads slow down (two of 1.5 s, then three that hang until the
client gives up): the third leg's read is under way when the run's deadline comes. The run
is cancelled where it is, schedules its retry, and releases its locks; the next attempt looks
the third leg up (it was sent) and finishes. An order is sent only with at least
`HTTP_READ_TIMEOUT_SECONDS + 1` left before the deadline, and none after it.

{table(rows)}
"""
            write_section("deadline", "A run that reaches its deadline", body)
        assert all(r.status == "ACTIVE" for r in runs)
        assert sum(r.late_orders + r.duplicates + r.runs_overlap for r in runs) == 0
        assert all(r.orders == 10 for r in runs)


def _counts(values: list[int]) -> str:
    return ", ".join(f"{v}: {values.count(v)}" for v in sorted(set(values)))


async def test_run_safety_lost_lock(
    api: httpx.AsyncClient,
    sim: httpx.AsyncClient,
    sessions: Any,
    service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    runs = [
        await run_safety.lost_lock_scenario(api, sim, sessions, service_env, tmp_path)
        for _ in range(ROUNDS)
    ]
    rows: list[tuple[str, object]] = [
        ("positions (ten legs each)", len(runs)),
        ("lock connections terminated mid-run", sum(r.terminated for r in runs)),
        (
            "runs that stopped for want of proof (`position.ownership_lost`)",
            sum(r.ownership_lost for r in runs),
        ),
        ("orders the cut-off run sent after the cut", sum(r.orders_after_loss for r in runs)),
        ("positions where two runs sent orders at once", sum(r.orders_overlap for r in runs)),
        ("ended ACTIVE", sum(r.status == "ACTIVE" for r in runs)),
        ("orders on the exchange", sum(r.orders for r in runs)),
        ("orders placed twice (same orderLinkId)", sum(r.duplicates for r in runs)),
        (
            "legs re-sent and refused by Bybit as duplicates",
            sum(r.refused_duplicates for r in runs),
        ),
        ("POST to ACTIVE", _seconds([r.seconds_to_final for r in runs])),
    ]
    body = f"""
Command: {COMMAND} (`RUN_SAFETY_ROUNDS={ROUNDS}`). Settings: `STALE_EXECUTING_SECONDS=3`,
`RECOVERY_INTERVAL_SECONDS=1`, fill reads of 300 ms, Beat running.

Two legs into a ten-leg basket, the connection holding the run's advisory lock is terminated
with `pg_terminate_backend` (as a failover or a cut network would). PostgreSQL releases the
lock at once, so the sweep may resume the position once its heartbeat is stale. Before each
order the run proves, on that same connection, that it still holds the lock and the claim;
the cut connection cannot answer, and the run stops without sending. Before this, the first
run went on placing legs while the resumed one placed them too, and only Bybit's
duplicate-`orderLinkId` refusal stood between the user and a double basket.

{table(rows)}
"""
    write_section("lost-lock", "The run's lock connection lost mid-run", body)
    assert all(r.status == "ACTIVE" and r.ownership_lost == 1 for r in runs)
    assert sum(r.orders_after_loss + r.orders_overlap + r.duplicates for r in runs) == 0


async def test_run_safety_shared_account(
    api: httpx.AsyncClient,
    sim: httpx.AsyncClient,
    sessions: Any,
    service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    short = [
        await run_safety.shared_account_scenario(
            api, sim, sessions, service_env, tmp_path, balance="1500"
        )
        for _ in range(ROUNDS)
    ]
    ample = [
        await run_safety.shared_account_scenario(
            api, sim, sessions, service_env, tmp_path, balance="5000"
        )
        for _ in range(ROUNDS)
    ]
    refused_clean = sum(
        1
        for r in short
        for position_id, status in zip(r.orders_by_position, r.statuses, strict=True)
        if status == "FAILED"
        and r.orders_by_position[position_id] == 0
        and (r.errors[r.statuses.index("FAILED")] or "").startswith("pre-flight")
    )
    rows: list[tuple[str, object]] = [
        ("pairs with 1,500 USDT (one basket's worth)", len(short)),
        (
            "... one ACTIVE, one FAILED",
            sum(sorted(r.statuses) == ["ACTIVE", "FAILED"] for r in short),
        ),
        ("... the FAILED one refused at pre-flight with zero orders", refused_clean),
        ("... pairs whose orders interleaved", sum(r.interleaved for r in short)),
        ("pairs with 5,000 USDT (both covered)", len(ample)),
        ("... both ACTIVE", sum(r.statuses == ["ACTIVE", "ACTIVE"] for r in ample)),
        ("... pairs whose orders interleaved", sum(r.interleaved for r in ample)),
        (
            "waits for the account (`position.waiting_for_account`)",
            sum(r.waited for r in short + ample),
        ),
        (
            "waits seen by GET (`waiting_for_account: true`)",
            sum(r.seen_waiting for r in short + ample),
        ),
        (
            "attempts used by waiting",
            sum(sum(a) - len(a) for a in (r.attempts for r in short + ample)),
        ),
    ]
    body = f"""
Command: {COMMAND} (`RUN_SAFETY_ROUNDS={ROUNDS}`). One worker, two pool processes; every
order and fill read of the account takes 100 ms, so the two runs overlap.

Two BLUECHIP 1,000 baskets of one account posted together. A basket holds its account from
its claim until it is final (the check and the claim under a PostgreSQL advisory lock per
account); the other one gives its worker slot back and is sent again shortly, with no attempt
used, so its pre-flight sees the balance the first left. Before this, both passed
pre-flight on the same 1,500 USDT, their legs interleaved, and both failed at leg 1 (110007)
holding only BTC.

{table(rows)}
"""
    write_section("shared-account", "Two baskets of one account at once", body)
    assert refused_clean == len(short)
    assert all(r.statuses == ["ACTIVE", "ACTIVE"] and not r.interleaved for r in ample)


async def test_run_safety_dead_run_reconciliation(
    api: httpx.AsyncClient,
    sim: httpx.AsyncClient,
    sessions: Any,
    service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    runs = [
        await run_safety.dead_run_reconciliation_scenario(api, sim, sessions, service_env, tmp_path)
        for _ in range(ROUNDS)
    ]
    rows: list[tuple[str, object]] = [
        ("workers killed after a fill, before it was recorded", len(runs)),
        ("positions left EXECUTING", sum(r.status_when_reconciled == "EXECUTING" for r in runs)),
        (
            "fills on the exchange missing from `trades`",
            sum(r.orders_on_exchange - r.trades_before for r in runs),
        ),
        (
            "reported by reconciliation (`missing_fill`)",
            sum(r.issues == ["missing_fill"] for r in runs),
        ),
        (
            "logged `reconciliation.mismatch` with `position_status: EXECUTING`",
            sum(r.mismatch_logged for r in runs),
        ),
        (
            "fills recorded from the exchange's record",
            sum(r.trades_after - r.trades_before for r in runs),
        ),
    ]
    body = f"""
Command: {COMMAND} (`RUN_SAFETY_ROUNDS={ROUNDS}`). `RECONCILE_SETTLE_SECONDS=0`, no Beat.

A worker SIGKILLed after the exchange filled a leg and while the fill read hangs: the position
stays EXECUTING with a fill the books lack. Reconciliation (the Beat job, run on a new worker)
now covers every position that changed since it was last reconciled, EXECUTING ones whose run
is not alive included, in pages with `reconciled_at` as the bookmark (no fixed top-N), and
leaves `updated_at` and the ETag alone unless it records something. Before this it looked only
at the 200 most recently updated final positions.

{table(rows)}
"""
    write_section("dead-run-reconciliation", "A fill left unrecorded by a dead run", body)
    assert all(r.issues == ["missing_fill"] and r.mismatch_logged for r in runs)
