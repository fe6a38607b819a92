"""docs/architecture.md's table of timings says what the code computes from the settings."""

from __future__ import annotations

import re
from dataclasses import fields
from decimal import Decimal
from pathlib import Path

from pydantic import SecretStr

from celery_app import visibility_timeout
from service.config import Settings
from service.execution.run_lock import CONFIRM_TIMEOUT_SECONDS
from service.security import generate_key_pair

ROOT = Path(__file__).resolve().parents[2]


def _documented() -> dict[str, float]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("<!-- timings -->", 1)[1].split("<!-- /timings -->", 1)[0]
    rows = re.findall(r"^\| (.+?) \| .+? \| ([\d,.]+) s \|$", table, re.MULTILINE)
    return {what: float(value.replace(",", "")) for what, value in rows}


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
        "a resumed basket waits in line for the account's lock": (
            settings.account_lock_wait_seconds
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


def test_every_run_knob_defaults_to_its_setting_and_the_worker_passes_it() -> None:
    from service.execution import ExecutionDeps

    private_key = SecretStr(generate_key_pair().private_key)  # a worker opens with it
    changed = Settings.model_construct(
        credentials_private_keys=private_key,
        **{
            name: (info.default * 2 if not isinstance(info.default, bool) else info.default)
            for name, info in Settings.model_fields.items()
            if isinstance(info.default, (int, float, Decimal))
        },
    )
    built = ExecutionDeps.from_settings(
        changed,
        sessions=None,  # type: ignore[arg-type]
        run_lock=None,  # type: ignore[arg-type]
        exchange=None,  # type: ignore[arg-type]
        market=None,  # type: ignore[arg-type]
        memo=None,  # type: ignore[arg-type]
        publisher=None,
    )
    plain = ExecutionDeps(
        sessions=None,  # type: ignore[arg-type]
        run_lock=None,  # type: ignore[arg-type]
        exchange=None,  # type: ignore[arg-type]
        market=None,  # type: ignore[arg-type]
        cipher=None,  # type: ignore[arg-type]
        retry_delays=(),
    )
    knobs = [
        f.name
        for f in fields(ExecutionDeps)
        if isinstance(getattr(plain, f.name), (int, float, Decimal))
    ]
    assert len(knobs) >= 15
    for name in knobs:
        # Built from settings every knob follows them (two are derived: the market data's
        # age from the refresh period, the order reserve from the HTTP read timeout).
        assert getattr(built, name) != getattr(plain, name), name
