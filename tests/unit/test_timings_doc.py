"""docs/architecture.md's table of timings says what the code computes from the settings."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from celery_app import visibility_timeout
from service.config import Settings
from service.execution import ExecutionDeps
from service.run_lock import CONFIRM_TIMEOUT_SECONDS

ROOT = Path(__file__).resolve().parents[2]


def _documented() -> dict[str, float]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("<!-- timings -->", 1)[1].split("<!-- /timings -->", 1)[0]
    rows = re.findall(r"^\| (.+?) \| .+? \| ([\d,.]+) s \|$", table, re.MULTILINE)
    return {what: float(value.replace(",", "")) for what, value in rows}


def _deps_default(name: str) -> float:
    return float(next(f.default for f in fields(ExecutionDeps) if f.name == name))  # type: ignore[arg-type]


def test_the_documented_timings_are_the_code_s() -> None:
    # The defaults, as a deployment without overrides gets them (not this test run's
    # environment, which shortens several).
    settings = Settings.model_construct()
    documented = _documented()
    expected = {
        "run deadline": settings.run_deadline_seconds,
        "run grace (then the runtime cancels; draining gets as long again)": (
            settings.run_grace_seconds
        ),
        "Celery soft time limit (backstop)": settings.soft_time_limit_seconds,
        "Celery hard time limit": settings.task_time_limit_seconds,
        "least time left to start an order": settings.http_read_timeout_seconds + 1,
        "ownership check and lock release timeout": CONFIRM_TIMEOUT_SECONDS,
        "a resumed basket waits in line for the account's lock": _deps_default(
            "account_lock_wait_seconds"
        ),
        "then asks again after": settings.account_retry_seconds,
        "a waiting basket missed by its hand-off is sent again after": (
            settings.stale_pending_seconds
        ),
        "longest total wait of a new basket for its account": (settings.account_wait_limit_seconds),
        "a database statement that hangs fails after": settings.db_statement_timeout_seconds,
        "a dead database peer is found after": settings.db_dead_peer_seconds,
        "a silent run may be resumed after": settings.stale_executing_seconds,
        "Redis visibility timeout": visibility_timeout(settings),
    }
    assert documented == expected
