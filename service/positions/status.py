"""The one function that changes a position's status: the compare-and-set, the finished-count
metric and the `position.status_changed` audit event, together, after the commit.

Every transition goes through here: the claim and the finish or failure of a run, a close
request, the end of a close, and the recovery sweep giving up on a dead run. A new basket's
claim and its ACTIVE are written by the run's own statements on its lock connection
(service/positions/run_statements.py: the same conditions) and reported here
(`report_change`).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from service.db import SessionScope
from service.metrics import POSITIONS_FINISHED
from service.models import PositionStatus, SyntheticPosition
from service.positions import repository

logger = structlog.stdlib.get_logger("service.positions")


@dataclass(frozen=True, slots=True)
class Transition:
    """`expected` -> `new`, written only while the position is in `expected` and, when
    given, under `require_claim` and with its run lock held by backend `lock_pid`."""

    expected: PositionStatus
    new: PositionStatus
    claim: str | None = None  # the claim written with EXECUTING
    require_claim: str | None = None
    lock_pid: int | None = None
    require_no_run: bool = False  # and no run holds its lock (the recovery sweep's writes)
    error: str | None = None  # the user-facing reason of a FAILED position
    failed_leg: int | None = None


async def change_status(
    sessions: SessionScope,
    position_id: uuid.UUID,
    transition: Transition,
    *,
    log: structlog.stdlib.BoundLogger | None = None,
    with_writes: Callable[[AsyncSession], Awaitable[None]] | None = None,
) -> SyntheticPosition | None:
    """Apply `transition` in one transaction (with `with_writes`, e.g. the ACTIVE snapshot,
    in the same one); None, and nothing written, when the position was not in the state the
    transition expects. The metric and the event follow the commit, so they never report a
    change that rolled back."""
    async with sessions() as session:
        if with_writes is not None:
            await with_writes(session)
        changed = await repository.compare_and_set_status(
            session,
            position_id,
            expected=transition.expected,
            new=transition.new,
            claim=transition.claim,
            require_claim=transition.require_claim,
            lock_pid=transition.lock_pid,
            require_no_run=transition.require_no_run,
            error=transition.error,
            failed_leg=transition.failed_leg,
        )
        if changed is None:
            # Roll back what `with_writes` added: the position is not this caller's to change.
            await session.rollback()
            return None
    report_change(position_id, transition, log)
    return changed


def report_change(
    position_id: uuid.UUID,
    transition: Transition,
    log: structlog.stdlib.BoundLogger | None = None,
) -> None:
    """The metric and the audit event of a change of status, once it is committed (by
    `change_status`, or by one of a run's own statements: service/positions/run_statements.py)."""
    if transition.new.is_final:
        POSITIONS_FINISHED.labels(transition.new.value).inc()
    log = log or logger.bind(position_id=str(position_id))
    fields: dict[str, object] = {
        "from_status": transition.expected,
        "to_status": transition.new,
    }
    if transition.error is not None:
        fields.update(error=transition.error, leg=transition.failed_leg)
    if transition.new in (PositionStatus.FAILED, PositionStatus.CLOSE_FAILED):
        log.error("position.status_changed", **fields)
    else:
        log.info("position.status_changed", **fields)
