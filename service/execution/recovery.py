"""The recovery sweep (run by Beat): re-send positions whose enqueue was lost, and resume
positions whose worker died mid-run, opening or closing.

A stale PENDING position (or a CLOSING one no task has claimed) is re-sent with a new task id
(the claim's compare-and-set lets only one run win). A stale EXECUTING position (or a claimed
CLOSING one) whose run lock nobody holds is re-sent with its claim as the task id, so the
claim holder resumes it from its stored plan and looks every sent order up before placing
anything.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import structlog

from service.db import SessionScope
from service.models import PositionStatus
from service.positions import locks, repository
from service.positions.status import Transition, change_status
from service.queue import TaskPublisher, task_for

logger = structlog.stdlib.get_logger("service.execution.recovery")


@dataclass
class RecoveryReport:
    resent_pending: list[uuid.UUID] = field(default_factory=list)
    resumed_executing: list[uuid.UUID] = field(default_factory=list)
    failed: list[uuid.UUID] = field(default_factory=list)


async def recover_stale_positions(
    sessions: SessionScope,
    publisher: TaskPublisher,
    *,
    stale_pending_seconds: float,
    stale_executing_seconds: float,
    max_runs: int,
    batch: int = 100,
) -> RecoveryReport:
    report = RecoveryReport()
    async with sessions() as session:
        pending = await repository.stale_pending(
            session, older_than_seconds=stale_pending_seconds, limit=batch
        )
    for unclaimed in pending:
        await publisher.publish(unclaimed.id, task=task_for(unclaimed.status))
        async with sessions() as session:
            await repository.touch_pending(session, unclaimed.id)
        logger.warning(
            "recovery.pending_resent", position_id=str(unclaimed.id), status=unclaimed.status
        )
        report.resent_pending.append(unclaimed.id)

    async with sessions() as session:
        stale = await repository.stale_executing(
            session, older_than_seconds=stale_executing_seconds, limit=batch
        )
    for position in stale:
        async with sessions() as session:
            alive = await locks.is_run_alive(session, position.id)
        if alive:
            continue
        status = PositionStatus(position.status)
        if position.attempts >= max_runs or position.claim is None:
            reason = f"gave up after {position.attempts} runs without finishing"
            closing = status is PositionStatus.CLOSING
            if closing:
                reason += "; what the close did not sell or buy back is still held: close again"
            failed = await change_status(
                sessions,
                position.id,
                # Only as the sweep saw it: same claim, and still no run holding it.
                Transition(
                    status,
                    PositionStatus.CLOSE_FAILED if closing else PositionStatus.FAILED,
                    require_claim=position.claim,
                    require_no_run=True,
                    error=reason,
                ),
            )
            if failed is not None:
                report.failed.append(position.id)
            continue
        async with sessions() as session:
            # Restart the staleness clock so the next sweep does not re-send it again.
            await repository.touch_heartbeat(session, position.id, status)
        await publisher.publish(position.id, task_id=position.claim, task=task_for(status))
        logger.warning(
            "recovery.executing_resumed",
            position_id=str(position.id),
            claim=position.claim,
            status=status,
        )
        report.resumed_executing.append(position.id)
    return report
