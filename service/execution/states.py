"""The run's status steps: claim the position, finish it ACTIVE with its snapshot, or fail
it. Each goes through `service.positions.status.change_status`, fenced by the run's claim
and by its lock's backend (a run that lost its lock cannot write)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from decimal import Decimal

import structlog

from service.execution import legs
from service.execution.deps import ExecutionDeps, Run, RunLease
from service.execution.outcomes import Outcome, OwnershipLostError, RunResult
from service.models import PositionLeg, PositionStatus, SyntheticPosition
from service.positions import repository, run_statements
from service.positions.status import Transition, change_status, report_change


async def claim(
    deps: ExecutionDeps,
    position: SyntheticPosition,
    task_id: str,
    lease: RunLease,
    log: structlog.stdlib.BoundLogger,
) -> SyntheticPosition | RunResult:
    """PENDING -> EXECUTING under `task_id`, or the claim holder resumes (a retry, a
    redelivery); a RunResult when the claim changed before this run could take it."""
    if position.status == PositionStatus.PENDING:
        # One statement on the lock connection (fenced by its lock, as change_status is).
        claimed = await run_statements.claim_new(lease, position.id, task_id)
        if claimed is not None:
            report_change(
                position.id,
                Transition(PositionStatus.PENDING, PositionStatus.EXECUTING, claim=task_id),
                log,
            )
            return claimed
    else:
        async with deps.sessions() as session:
            resumed = await repository.resume_claimed(
                session, position.id, task_id, lock_pid=lease.pid
            )
        if resumed is not None:
            log.info("position.resumed", attempts=resumed.attempts)
            return resumed
    log.info("position.discarded", reason="the claim changed before this run could take it")
    return RunResult(Outcome.DISCARDED, detail="claim lost")


async def fail(
    deps: ExecutionDeps,
    position_id: uuid.UUID,
    task_id: str,
    reason: str,
    leg: int | None,
    log: structlog.stdlib.BoundLogger,
    lock_pid: int,
) -> RunResult:
    await change_status(
        deps.sessions,
        position_id,
        Transition(
            PositionStatus.EXECUTING,
            PositionStatus.FAILED,
            require_claim=task_id,
            lock_pid=lock_pid,
            error=reason,
            failed_leg=leg,
        ),
        log=log,
    )
    return RunResult(Outcome.FAILED, detail=reason)


async def claim_and_fail(
    deps: ExecutionDeps,
    position: SyntheticPosition,
    task_id: str,
    lease: RunLease,
    reason: str,
    log: structlog.stdlib.BoundLogger,
) -> RunResult:
    """Fail a position before its first order (claimed first: only EXECUTING fails)."""
    claimed = await claim(deps, position, task_id, lease, log)
    if isinstance(claimed, RunResult):
        return claimed
    return await fail(deps, position.id, task_id, reason, None, log, lease.pid)


async def finish(
    deps: ExecutionDeps,
    run: Run,
    plan: Sequence[PositionLeg],
    log: structlog.stdlib.BoundLogger,
    fills: Sequence[legs.Fill] = (),
) -> None:
    """`fills` (read and not yet recorded: a complete batch's) recorded, and the snapshot of
    what filled (not what was planned) and ACTIVE, in one transaction; `position.partial`
    when a leg fell short."""
    position = run.position
    # One statement on the lock connection: the fills, the snapshot and the status, one
    # commit, the status and the snapshot fenced by the run's lock and claim.
    filled = await run_statements.finish_active(
        run.lease, position.id, run.claim, legs.fill_rows(run, fills)
    )
    legs.report_filled(fills)
    if filled is None:
        # This run lost the position (its lock, or the state changed): the snapshot rolled
        # back, and the one that holds it decides.
        raise OwnershipLostError("the position was not this run's to finish any more")
    report_change(
        position.id,
        Transition(PositionStatus.EXECUTING, PositionStatus.ACTIVE, require_claim=run.claim),
        log,
    )
    short = [leg for leg in plan if filled.get(leg.leg, Decimal(0)) < leg.quantity]
    if short:
        # Held, but not all of the basket: the book was too thin for some legs.
        log.warning(
            "position.partial",
            legs=[
                {
                    "leg": leg.leg,
                    "symbol": leg.symbol,
                    "planned_qty": str(leg.quantity),
                    "filled_qty": str(filled.get(leg.leg, Decimal(0))),
                    "shortfall_qty": str(leg.quantity - filled.get(leg.leg, Decimal(0))),
                }
                for leg in short
            ],
        )
