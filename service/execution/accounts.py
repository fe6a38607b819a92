"""One basket at a time per exchange account: a basket whose account is busy waits (marked,
with no attempt used and no worker slot held), and the basket holding the account sends the
one that has waited longest when it is final."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import structlog

from service.execution import states
from service.execution.deps import ExecutionDeps, RunLease
from service.execution.outcomes import Outcome, RunResult
from service.models import PositionStatus, SyntheticPosition
from service.positions import repository, run_statements


async def holder_of(
    deps: ExecutionDeps, lease: RunLease, position: SyntheticPosition
) -> SyntheticPosition | None:
    """Another basket of the account that has begun and not ended: it holds the account until
    it is final, between its retries too (a new basket's pre-flight must not count on its
    balance). Looked for on the lock connection; the holder itself is read only when there is
    one."""
    holder = await run_statements.holder_id(lease, position)
    if holder is None:
        return None
    async with deps.sessions() as session:
        return await repository.get_position(session, holder)


async def mark_waiting(deps: ExecutionDeps, position_id: uuid.UUID) -> datetime | None:
    async with deps.sessions() as session:
        return await repository.mark_waiting_for_account(session, position_id)


async def hand_off(
    deps: ExecutionDeps, user_id: uuid.UUID, log: structlog.stdlib.BoundLogger
) -> None:
    """Send the account's basket that has waited longest (if any): its turn has come."""
    if deps.publisher is None:
        return
    async with deps.sessions() as session:
        waiting = await repository.next_waiting(session, user_id)
    if waiting is None:
        return
    try:
        await deps.publisher.publish(waiting)
    except Exception as error:  # the broker's errors are many; the sweep sends it anyway
        log.warning("account.hand_off_failed", next_position_id=str(waiting), error=str(error))
        return
    log.info("account.handed_off", next_position_id=str(waiting))


async def wait_for_account(
    deps: ExecutionDeps,
    position: SyntheticPosition,
    holder: SyntheticPosition | None,
    task_id: str,
    lease: RunLease,
    log: structlog.stdlib.BoundLogger,
    *,
    since: datetime | None = None,
) -> RunResult:
    """Another basket of the same account has begun and not ended (`holder`), or holds the
    account's lock this instant. A new basket is marked waiting and gives its worker slot
    back, with no attempt used and nothing polling: the holder sends it when it is final (the
    recovery sweep, if that send is lost). One that has waited too long in all fails with
    nothing sent. A basket being resumed goes first: it asks again shortly, and never fails
    for waiting. `since`: when the wait began, if the caller marked it already."""
    if since is None:
        since = await mark_waiting(deps, position.id)
    waited = (datetime.now(UTC) - since).total_seconds() if since else 0.0
    busy_with = str(holder.id) if holder is not None else "the account's lock"
    if position.status == PositionStatus.EXECUTING:
        log.info(
            "position.waiting_for_account",
            busy_with=busy_with,
            waited_s=round(waited, 1),
            retry_in_s=deps.account_retry_seconds,
        )
        return RunResult(
            Outcome.RETRY, retry_in=deps.account_retry_seconds, detail="waiting for the account"
        )
    if waited >= deps.account_wait_limit_seconds:
        reason = (
            f"waited {waited:.0f} s for the other baskets of the same exchange account to "
            f"finish (limit {deps.account_wait_limit_seconds:g} s); no order was sent"
        )
        return await states.claim_and_fail(deps, position, task_id, lease, reason, log)
    log.info("position.waiting_for_account", busy_with=busy_with, waited_s=round(waited, 1))
    return RunResult(Outcome.WAITING, detail="waiting for the account")
