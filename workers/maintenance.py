"""Beat jobs: thin adapters over service.recovery."""

from __future__ import annotations

from celery_app import app
from service.config import get_settings
from service.recovery import recover_stale_positions
from workers.trade_executor import runtime

# Extra runs allowed beyond the retry schedule (a crashed run counts as an attempt).
_CRASH_ALLOWANCE = 2


@app.task(name="workers.maintenance.recover_stale_positions")
def recover_stale_positions_task() -> dict[str, int]:
    settings = get_settings()
    report = runtime.run(
        lambda r: recover_stale_positions(
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
