"""The execution flow of one position, top to bottom as the product's steps.

A run holds the position's lock (serialising deliveries of one task), then its exchange
account's lock (one basket at a time per account: `accounts`), then claims the position
(PENDING -> EXECUTING, or the claim holder resumes: `states`) -> plans once (`plan`) ->
pre-flight (`preflight`) -> each leg in order (`legs`) -> the snapshot of what filled and
ACTIVE (`states.finish`). A permanent error fails the position at once; a transient one asks
the caller (the Celery task) to run again after the next delay (a rate limit or an IP ban:
when it ends, with no attempt used). The run has one deadline: past it nothing more is sent.

This module imports neither Celery nor FastAPI; its dependencies come in `ExecutionDeps`.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg
import structlog
from sqlalchemy.exc import SQLAlchemyError

from service.execution import accounts, batch, closing, legs, plan, runs, states
from service.execution.deps import ExecutionDeps, Run, RunLease
from service.execution.outcomes import (
    CredentialsUnreadableError,
    Outcome,
    OwnershipLostError,
    PermanentRunError,
    RunResult,
    TransientRunError,
)
from service.execution.preflight import EarlyReads, preflight, start_reads
from service.models import ExecutionMode, PositionLeg, PositionStatus, SyntheticPosition, Trade
from service.positions import repository, run_statements

logger = structlog.stdlib.get_logger("service.execution")


async def execute_position(
    deps: ExecutionDeps, position_id: uuid.UUID, *, task_id: str, deadline: float | None = None
) -> RunResult:
    """Run (or resume) one position. Every run counts as an attempt, a crashed one too, so
    `TRADE_RETRY_DELAYS` bounds the number of runs whatever happens to the messages; waiting
    for the account does not count. `deadline` is the event-loop time past which nothing more
    is sent."""
    structlog.contextvars.bind_contextvars(position_id=str(position_id), task_id=task_id)
    log = logger.bind()
    try:
        return await _execute(deps, position_id, task_id, deadline, log)
    except (SQLAlchemyError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as error:
        # asyncpg's statement timeout is a bare TimeoutError: say what it means.
        detail = (
            "the database did not answer within DB_STATEMENT_TIMEOUT_SECONDS"
            if isinstance(error, TimeoutError)
            else f"{type(error).__name__}: {error}"
        )
        log.error("run.database_unavailable", error=detail)
        return RunResult(Outcome.ABORTED, detail=detail)


async def _execute(
    deps: ExecutionDeps,
    position_id: uuid.UUID,
    task_id: str,
    deadline: float | None,
    log: structlog.stdlib.BoundLogger,
) -> RunResult:
    async with deps.run_lock(position_id) as lease:
        if lease is None:
            return await _locked(deps, position_id, log)
        position = await _eligible(deps, lease, position_id, task_id, log)
        if isinstance(position, RunResult):
            return position
        if position.status == PositionStatus.CLOSING:
            structlog.contextvars.bind_contextvars(phase="close")
            return await closing.close_position(deps, position, task_id, lease, deadline)
        structlog.contextvars.bind_contextvars(phase="open")
        resuming = position.status == PositionStatus.EXECUTING
        wait = deps.account_lock_wait_seconds if resuming else 0
        result: RunResult | None = None
        holder: SyntheticPosition | None = None
        waiting_since: datetime | None = None
        for look in (1, 2):
            async with lease.account(position.user_id, wait_seconds=wait) as account_locked:
                holder = None
                if account_locked and not resuming:
                    holder = await accounts.holder_of(deps, lease, position)
                if account_locked and holder is None:
                    result = await _run_holding_account(
                        deps, position, task_id, lease, deadline, log
                    )
                    break
            if resuming or look == 2:
                return await accounts.wait_for_account(
                    deps, position, holder, task_id, lease, log, since=waiting_since
                )
            # Marked waiting before one more look: a holder that ended this instant looked for
            # waiting baskets before this one was marked, and would not have sent it.
            waiting_since = await accounts.mark_waiting(deps, position.id)
        assert result is not None
        if result.outcome in (Outcome.ACTIVE, Outcome.FAILED):
            # The account is free: its next basket need not wait for the recovery sweep.
            await accounts.hand_off(deps, position.user_id, log)
        return result


async def _locked(
    deps: ExecutionDeps, position_id: uuid.UUID, log: structlog.stdlib.BoundLogger
) -> RunResult:
    """Another run holds the position's lock. A close no task has claimed yet is asked for
    again shortly: the holder is the opening's run finishing (a close asked for the moment
    it ended), which will not run the close. Anything else is that run's."""
    async with deps.sessions() as session:
        current = await repository.get_position(session, position_id)
    if current is not None and current.status == PositionStatus.CLOSING and current.claim is None:
        log.info(
            "position.waiting_for_lock",
            reason="another run holds the position",
            retry_in_s=deps.account_retry_seconds,
        )
        return RunResult(Outcome.RETRY, retry_in=deps.account_retry_seconds, detail="locked")
    log.warning("position.discarded", reason="another run holds the position")
    return RunResult(Outcome.DISCARDED, detail="locked")


async def _eligible(
    deps: ExecutionDeps,
    lease: RunLease,
    position_id: uuid.UUID,
    task_id: str,
    log: structlog.stdlib.BoundLogger,
) -> SyntheticPosition | RunResult:
    """May this task run the position? PENDING, or a CLOSING one not claimed yet, or EXECUTING
    or CLOSING under this task's claim with its retry due. Only read (on the lock connection):
    the claim is written once the account is held."""
    current = await run_statements.position(lease, position_id)
    if current is None:
        log.warning("position.not_found")
        return RunResult(Outcome.NOT_FOUND)
    if current.status == PositionStatus.PENDING or (
        current.status == PositionStatus.CLOSING and current.claim is None
    ):
        return current
    if not PositionStatus(current.status).is_run or current.claim != task_id:
        log.info("position.discarded", status=current.status, reason="not this task's claim")
        return RunResult(Outcome.DISCARDED, detail=current.status)
    if current.next_attempt_at is not None:
        remaining = (current.next_attempt_at - datetime.now(UTC)).total_seconds()
        if remaining > deps.early_tolerance_seconds:
            # A stray copy (e.g. redelivered) arrived before the scheduled retry is due.
            log.info("position.discarded", reason="retry not yet due", due_in_s=remaining)
            return RunResult(Outcome.DISCARDED, detail="early")
    return current


async def _run_holding_account(
    deps: ExecutionDeps,
    position: SyntheticPosition,
    task_id: str,
    lease: RunLease,
    deadline: float | None,
    log: structlog.stdlib.BoundLogger,
) -> RunResult:
    try:
        credentials = await runs.credentials(deps, lease, position)
    except CredentialsUnreadableError as error:
        log.error("run.credentials_unreadable", error=str(error))
        age = (datetime.now(UTC) - position.created_at).total_seconds()
        if position.status == PositionStatus.PENDING and age > deps.unreadable_key_grace_seconds:
            # Not a worker missing a key for a moment (a rotation rolling out): the stored key
            # is unreadable. Nothing was sent; the user must store it again.
            reason = (
                f"the stored API key cannot be decrypted ({error}); store it again with "
                "PUT /api/credentials. No order was sent"
            )
            return await states.claim_and_fail(deps, position, task_id, lease, reason, log)
        return RunResult(Outcome.ABORTED, detail=str(error))
    except PermanentRunError as error:
        return await states.claim_and_fail(deps, position, task_id, lease, error.message, log)
    fresh = position.status == PositionStatus.PENDING
    # A new basket's pre-flight reads go out now, their round trip covering its claim and its
    # plan: the account is held, and its symbols are known from the catalogue in memory.
    index = deps.indices.peek(position.index_code) if fresh else None
    early = (
        start_reads(deps, credentials, [c.symbol for c in index.components])
        if index is not None
        else None
    )
    try:
        claimed = await states.claim(deps, position, task_id, lease, log)
        if isinstance(claimed, RunResult):
            return claimed
        structlog.contextvars.bind_contextvars(attempt=claimed.attempts)
        run = Run(
            claimed,
            task_id,
            credentials,
            lease,
            deadline,
            retries_done=claimed.attempts - 1,
            fresh=fresh,
        )
        return await _run_claimed(deps, run, log, early)
    finally:
        if early is not None:
            await early.cancel()  # not left running if the run ended before its pre-flight


async def _run_claimed(
    deps: ExecutionDeps,
    run: Run,
    log: structlog.stdlib.BoundLogger,
    early: EarlyReads | None = None,
) -> RunResult:
    position, task_id = run.position, run.claim
    deadline = asyncio.timeout_at(run.deadline)
    try:
        async with deadline:
            legs_planned, recorded = await _plan_and_preflight(deps, run, log, early)
            ends_position = functools.partial(runs.ends_run, deps, run)
            first = batch.FirstOrders(complete=False)
            if position.execution == ExecutionMode.BATCH:
                first = await batch.send_first_orders(
                    deps, run, legs_planned, recorded, log, ends_position=ends_position
                )
                if not first.complete:
                    # What is left (a partial fill's remainder) goes one order at a time.
                    recorded = await plan.recorded_trades(deps, position.id)
            if not first.complete:
                await legs.execute_legs(
                    deps,
                    run,
                    legs_planned,
                    recorded,
                    log,
                    ends_position=ends_position,
                    deadline_expired=deadline.expired,
                )
            await states.finish(deps, run, legs_planned, log, first.unrecorded)
            return RunResult(Outcome.ACTIVE)
    except TimeoutError:
        if not deadline.expired():
            raise
        # Cancelled where it was: an order in flight was sent before the deadline and is
        # looked up by the next run; nothing is sent after it.
        log.warning("run.deadline_passed")
        error = TransientRunError("the run's deadline passed before it finished", label="deadline")
        return await _retry_later(deps, run, error, log)
    except OwnershipLostError as error:
        log.error("position.ownership_lost", error=str(error))
        return RunResult(Outcome.DISCARDED, detail="ownership lost")
    except PermanentRunError as error:
        return await states.fail(
            deps, position.id, task_id, error.message, error.leg, log, run.lease.pid
        )
    except TransientRunError as error:
        return await _retry_later(deps, run, error, log)


async def _plan_and_preflight(
    deps: ExecutionDeps,
    run: Run,
    log: structlog.stdlib.BoundLogger,
    early: EarlyReads | None = None,
) -> tuple[Sequence[PositionLeg], list[Trade]]:
    """The plan, what earlier runs recorded of it, and (while no order of it was sent) the
    pre-flight. A new basket's pre-flight reads go out as soon as its symbols are known:
    `early`, the reads sent before the claim, or sent here once the plan knows them."""

    def send_reads(symbols: Sequence[str]) -> None:
        nonlocal early
        if early is None:
            early = start_reads(deps, run.credentials, symbols)

    try:
        legs_planned, new = await plan.ensure_plan(deps, run, log, on_new_basket=send_reads)
        # A plan stored just now has no order sent and nothing recorded.
        recorded = [] if new else await plan.recorded_trades(deps, run.position.id)
        if not recorded and all(leg.submitted_at is None for leg in legs_planned):
            await preflight(deps, run, legs_planned, log, early=early)
    finally:
        if early is not None:
            await early.cancel()  # not left running if the run failed before its pre-flight
    return legs_planned, recorded


async def _retry_later(
    deps: ExecutionDeps, run: Run, error: TransientRunError, log: structlog.stdlib.BoundLogger
) -> RunResult:
    if runs.ends_run(deps, run, error):
        reason = f"gave up after {run.retries_done + 1} attempts: {error.message}"
        return await states.fail(
            deps, run.position.id, run.claim, reason, error.leg, log, run.lease.pid
        )
    return await runs.schedule_retry(deps, run, error, log)
