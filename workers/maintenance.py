"""Beat jobs: thin adapters over service.execution.recovery."""

from __future__ import annotations

from typing import Any

from celery.signals import worker_ready

from celery_app import app
from service.config import get_settings
from service.execution.reconciliation import reconcile_positions
from service.execution.recovery import recover_stale_positions
from service.market.refresh import refresh_market_cache
from workers.trade_executor import runtime

# Extra runs allowed beyond the retry schedule (a crashed run counts as an attempt).
_CRASH_ALLOWANCE = 2


@app.task(name="workers.maintenance.recover_stale_positions")
def recover_stale_positions_task() -> dict[str, int]:
    settings = get_settings()
    report = runtime.run(
        lambda r, _deadline: recover_stale_positions(
            r.sessions,
            r.publisher,
            stale_pending_seconds=settings.stale_pending_seconds,
            stale_executing_seconds=settings.stale_executing_seconds,
            max_runs=len(settings.trade_retry_delays) + 1 + _CRASH_ALLOWANCE,
        )
    )
    return {
        "resent_pending": len(report.resent_pending),
        "resumed_executing": len(report.resumed_executing),
        "failed": len(report.failed),
    }


REFRESH_MARKET_DATA = "workers.maintenance.refresh_market_data"


@app.task(name=REFRESH_MARKET_DATA)
def refresh_market_data_task() -> int:
    snapshot = runtime.run(
        lambda r, _deadline: refresh_market_cache(r.sessions, r.deps.market, r.market_cache)
    )
    return len(snapshot.instruments)


@worker_ready.connect
def _warm_market_cache(sender: Any = None, **_: object) -> None:
    # The API refuses to size positions without a snapshot: warm it as soon as a worker is up
    # instead of waiting for Beat's first tick.
    app.send_task(REFRESH_MARKET_DATA, queue=get_settings().celery_queue)


@app.task(name="workers.maintenance.reconcile_positions")
def reconcile_positions_task() -> dict[str, int]:
    settings = get_settings()
    report = runtime.run(
        lambda r, deadline: reconcile_positions(
            r.deps,
            window_seconds=settings.reconcile_window_seconds,
            settle_seconds=settings.reconcile_settle_seconds,
            page_size=settings.reconcile_page_size,
            deadline=deadline,
        )
    )
    return {
        "positions": report.positions,
        "legs": report.legs,
        "mismatches": len(report.mismatches),
        "errors": report.errors,
    }
