"""SQL for positions, their plan, trades and snapshot. Every status change is one
compare-and-set UPDATE ... WHERE status = ... RETURNING, never read-then-write (made through
service.positions.status.change_status). The locks are in `locks`, reconciliation's rows in
`reconciliation_rows`."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    Integer,
    Numeric,
    String,
    Uuid,
    case,
    exists,
    func,
    literal,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.sql.elements import TextClause

from service.models import (
    ExchangeCredential,
    PositionCloseLeg,
    PositionCloseRequest,
    PositionComponent,
    PositionLeg,
    PositionStatus,
    ReconciliationIssue,
    SyntheticPosition,
    Trade,
)
from service.positions.locks import lock_held_by, no_run_holds


async def next_waiting(session: AsyncSession, user_id: uuid.UUID) -> uuid.UUID | None:
    """The account's new basket that has waited longest for it (first come, first served)."""
    result = await session.execute(
        select(SyntheticPosition.id)
        .where(
            SyntheticPosition.user_id == user_id,
            SyntheticPosition.status == PositionStatus.PENDING,
            SyntheticPosition.account_wait_since.is_not(None),
        )
        .order_by(SyntheticPosition.account_wait_since, SyntheticPosition.created_at)
        .limit(1)
    )
    return result.scalar_one_or_none()


async def add_position(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    index_code: str,
    size: Decimal,
    direction: str,
    execution: str = "sequential",
    idempotency_key: str | None = None,
    request_fingerprint: str | None = None,
) -> SyntheticPosition | None:
    """Insert a PENDING position, in the same statement as the check that the user has
    credentials stored (so a delete racing with it cannot leave a position no worker can
    trade). None when nothing was inserted: no credentials, or the user's Idempotency-Key
    is taken already.

    With a concurrent insert of the same key, PostgreSQL makes this wait for the other
    transaction and then answers "taken", so a following read sees the winner's row.
    """
    row = select(
        literal(uuid.uuid4(), Uuid),
        literal(user_id, Uuid),
        literal(index_code, String),
        literal(size, Numeric),
        literal(direction, String),
        literal(PositionStatus.PENDING.value, String),
        literal(0, Integer),
        literal(idempotency_key, String),
        literal(request_fingerprint, String),
        literal(execution, String),
    ).where(exists().where(ExchangeCredential.user_id == user_id))
    result = await session.execute(
        insert(SyntheticPosition)
        .from_select(
            [
                "id",
                "user_id",
                "index_code",
                "size",
                "direction",
                "status",
                "attempts",
                "idempotency_key",
                "request_fingerprint",
                "execution",
            ],
            row,
        )
        .on_conflict_do_nothing(index_elements=["user_id", "idempotency_key"])
        .returning(SyntheticPosition)
    )
    return result.scalar_one_or_none()


async def get_by_idempotency_key(
    session: AsyncSession, user_id: uuid.UUID, key: str
) -> SyntheticPosition | None:
    result = await session.execute(
        select(SyntheticPosition)
        .where(SyntheticPosition.user_id == user_id, SyntheticPosition.idempotency_key == key)
        .execution_options(populate_existing=True)
    )
    return result.scalar_one_or_none()


async def get_position(session: AsyncSession, position_id: uuid.UUID) -> SyntheticPosition | None:
    return await session.get(SyntheticPosition, position_id, populate_existing=True)


async def get_user_position(
    session: AsyncSession, user_id: uuid.UUID, position_id: uuid.UUID
) -> SyntheticPosition | None:
    result = await session.execute(
        select(SyntheticPosition).where(
            SyntheticPosition.id == position_id, SyntheticPosition.user_id == user_id
        )
    )
    return result.scalar_one_or_none()


async def list_user_positions(
    session: AsyncSession,
    user_id: uuid.UUID,
    *,
    limit: int,
    status: PositionStatus | None = None,
    before: tuple[datetime, uuid.UUID] | None = None,
) -> Sequence[SyntheticPosition]:
    """Newest first; `before` is the (created_at, id) of the last row of the previous page."""
    query = select(SyntheticPosition).where(SyntheticPosition.user_id == user_id)
    if status is not None:
        query = query.where(SyntheticPosition.status == status)
    if before is not None:
        query = query.where(
            tuple_(SyntheticPosition.created_at, SyntheticPosition.id) < tuple_(*before)
        )
    result = await session.execute(
        query.order_by(SyntheticPosition.created_at.desc(), SyntheticPosition.id.desc()).limit(
            limit
        )
    )
    return result.scalars().all()


async def compare_and_set_status(
    session: AsyncSession,
    position_id: uuid.UUID,
    *,
    expected: PositionStatus,
    new: PositionStatus,
    claim: str | None = None,
    require_claim: str | None = None,
    lock_pid: int | None = None,
    require_no_run: bool = False,
    error: str | None = None,
    failed_leg: int | None = None,
) -> SyntheticPosition | None:
    """Move a position from `expected` to `new`; None when it was not in `expected` (or not
    under `require_claim`, or its run lock is not held by backend `lock_pid`, or, with
    `require_no_run`, a run holds its lock). To CLOSING: a new close round begins, unclaimed
    (its task claims it), with its attempts counted afresh. `error` of CLOSE_FAILED is the
    close's (`close_error`): the opening's own stays."""
    conditions: list[ColumnElement[bool] | TextClause] = [
        SyntheticPosition.id == position_id,
        SyntheticPosition.status == expected,
    ]
    if require_claim is not None:
        conditions.append(SyntheticPosition.claim == require_claim)
    if lock_pid is not None:
        conditions.append(lock_held_by(position_id, lock_pid))
    if require_no_run:
        conditions.append(no_run_holds(position_id))
    # A position that changes state is no longer waiting for its account.
    values: dict[str, object] = {
        "status": new,
        "updated_at": func.clock_timestamp(),
        "account_wait_since": None,
    }
    if new is PositionStatus.EXECUTING:
        values.update(
            claim=claim,
            heartbeat_at=func.now(),
            attempts=SyntheticPosition.attempts + 1,
            next_attempt_at=None,
        )
    if new is PositionStatus.CLOSING:
        values.update(
            claim=None,
            heartbeat_at=func.now(),
            attempts=0,
            next_attempt_at=None,
            close_round=SyntheticPosition.close_round + 1,
            close_error=None,
            close_requested_at=func.now(),
        )
    if new.is_final:
        values.update(next_attempt_at=None)
    if error is not None and new is PositionStatus.CLOSE_FAILED:
        values.update(close_error=error)
    elif error is not None:
        values.update(error=error, failed_leg=failed_leg)
    result = await session.execute(
        update(SyntheticPosition)
        .where(*conditions)
        .values(**values)
        .returning(SyntheticPosition)
        # Refresh an instance this session already holds with what the UPDATE returned.
        .execution_options(synchronize_session=False, populate_existing=True)
    )
    return result.scalar_one_or_none()


async def claim_close(
    session: AsyncSession, position_id: uuid.UUID, claim: str, *, lock_pid: int
) -> SyntheticPosition | None:
    """A close task takes the CLOSING position's round: unclaimed, or already its own (a retry,
    a redelivery). Not a change of status: the close request made that."""
    return await _take_claim(
        session, position_id, claim, PositionStatus.CLOSING, lock_pid=lock_pid, unclaimed=True
    )


async def resume_claimed(
    session: AsyncSession, position_id: uuid.UUID, claim: str, *, lock_pid: int | None = None
) -> SyntheticPosition | None:
    """The claim holder continues an EXECUTING position (a retry or a redelivery)."""
    return await _take_claim(
        session, position_id, claim, PositionStatus.EXECUTING, lock_pid=lock_pid
    )


async def _take_claim(
    session: AsyncSession,
    position_id: uuid.UUID,
    claim: str,
    status: PositionStatus,
    *,
    lock_pid: int | None,
    unclaimed: bool = False,
) -> SyntheticPosition | None:
    """A run of `claim` (re)starts the position in `status`, under its run lock when
    `lock_pid` is given: one more attempt, no retry due, not waiting, a sign of life."""
    held = SyntheticPosition.claim == claim
    result = await session.execute(
        update(SyntheticPosition)
        .where(
            SyntheticPosition.id == position_id,
            SyntheticPosition.status == status,
            (SyntheticPosition.claim.is_(None) | held) if unclaimed else held,
            *([lock_held_by(position_id, lock_pid)] if lock_pid is not None else []),
        )
        .values(
            claim=claim,
            heartbeat_at=func.now(),
            attempts=SyntheticPosition.attempts + 1,
            next_attempt_at=None,
            account_wait_since=None,
            updated_at=func.clock_timestamp(),
        )
        .returning(SyntheticPosition)
        # Refresh an instance this session already holds with what the UPDATE returned.
        .execution_options(synchronize_session=False, populate_existing=True)
    )
    return result.scalar_one_or_none()


async def _touch(
    session: AsyncSession,
    position_id: uuid.UUID,
    values: dict[str, object],
    *,
    status: PositionStatus | None = None,
) -> None:
    conditions = [SyntheticPosition.id == position_id]
    if status is not None:
        conditions.append(SyntheticPosition.status == status)
    await session.execute(
        update(SyntheticPosition)
        .where(*conditions)
        .values(**values)
        .execution_options(synchronize_session=False)
    )


async def mark_waiting_for_account(
    session: AsyncSession, position_id: uuid.UUID
) -> datetime | None:
    """The position waits for another basket of its exchange account: note since when (the
    first time only: that is what GET shows, and what the total wait is measured from) and
    show a sign of life to the recovery sweep. Returns when the wait began."""
    waiting = SyntheticPosition.account_wait_since.is_not(None)
    result = await session.execute(
        update(SyntheticPosition)
        .where(
            SyntheticPosition.id == position_id,
            SyntheticPosition.status.in_(
                [PositionStatus.PENDING, PositionStatus.EXECUTING, PositionStatus.CLOSING]
            ),
        )
        .values(
            account_wait_since=func.coalesce(SyntheticPosition.account_wait_since, func.now()),
            heartbeat_at=func.now(),
            # A new wait changes what GET shows; a continued one does not.
            updated_at=case((waiting, SyntheticPosition.updated_at), else_=func.clock_timestamp()),
        )
        .returning(SyntheticPosition.account_wait_since)
        .execution_options(synchronize_session=False)
    )
    return result.scalar_one_or_none()


async def touch_heartbeat(
    session: AsyncSession, position_id: uuid.UUID, status: PositionStatus = PositionStatus.EXECUTING
) -> None:
    await _touch(session, position_id, {"heartbeat_at": func.now()}, status=status)


async def set_next_attempt(
    session: AsyncSession,
    position_id: uuid.UUID,
    claim: str,
    delay_seconds: float,
    *,
    lock_pid: int | None = None,
    refund_attempt: bool = False,
) -> datetime | None:
    """Record when the claim holder's next run is due (the database clock decides).
    `refund_attempt`: the run only waited out a limit, it does not count as an attempt."""
    result = await session.execute(
        update(SyntheticPosition)
        .where(
            SyntheticPosition.id == position_id,
            SyntheticPosition.status.in_([PositionStatus.EXECUTING, PositionStatus.CLOSING]),
            SyntheticPosition.claim == claim,
            *([lock_held_by(position_id, lock_pid)] if lock_pid is not None else []),
        )
        .values(
            next_attempt_at=func.now() + timedelta(seconds=delay_seconds),
            heartbeat_at=func.now(),
            updated_at=func.clock_timestamp(),
            attempts=(
                func.greatest(SyntheticPosition.attempts - 1, 0)
                if refund_attempt
                else SyntheticPosition.attempts
            ),
        )
        .returning(SyntheticPosition.next_attempt_at)
        .execution_options(synchronize_session=False)
    )
    return result.scalar_one_or_none()


async def get_plan(session: AsyncSession, position_id: uuid.UUID) -> Sequence[PositionLeg]:
    result = await session.execute(
        select(PositionLeg).where(PositionLeg.position_id == position_id).order_by(PositionLeg.leg)
    )
    return result.scalars().all()


# The rows a page of positions shows, by table.
PositionRow = TypeVar(
    "PositionRow", PositionLeg, PositionCloseLeg, Trade, PositionComponent, ReconciliationIssue
)


async def rows_of(
    session: AsyncSession,
    table: type[PositionRow],
    position_ids: Sequence[uuid.UUID],
    *order_by: InstrumentedAttribute[Any],
) -> Sequence[PositionRow]:
    """Every row of `table` belonging to any of the positions, in one statement."""
    result = await session.execute(
        select(table).where(table.position_id.in_(position_ids)).order_by(*order_by)
    )
    return result.scalars().all()


async def get_plans_of(
    session: AsyncSession, position_ids: Sequence[uuid.UUID]
) -> Sequence[PositionLeg]:
    return await rows_of(
        session, PositionLeg, position_ids, PositionLeg.position_id, PositionLeg.leg
    )


async def mark_changed(
    session: AsyncSession, position_id: uuid.UUID, *, run_alive: bool = False
) -> None:
    """What GET shows of the position changed (its plan, a fill): move `updated_at`, which
    its ETag follows. `run_alive`: the change is a run's, which renews `heartbeat_at` too."""
    values: dict[str, object] = {"updated_at": func.clock_timestamp()}
    if run_alive:
        values["heartbeat_at"] = func.now()
    await _touch(session, position_id, values)


async def set_position_idx(
    session: AsyncSession,
    position_id: uuid.UUID,
    by_leg: dict[int, int],
    *,
    close_round: int | None = None,
) -> None:
    """The positionIdx each leg's orders are sent with (its symbol's position mode): the
    opening's legs, or close round `close_round`'s."""
    if not by_leg:
        return
    if close_round is None:
        await session.execute(
            update(PositionLeg)
            .where(PositionLeg.position_id == position_id)
            .values(
                position_idx=case(by_leg, value=PositionLeg.leg, else_=PositionLeg.position_idx)
            )
            .execution_options(synchronize_session=False)
        )
        return
    await session.execute(
        update(PositionCloseLeg)
        .where(PositionCloseLeg.position_id == position_id, PositionCloseLeg.round == close_round)
        .values(
            position_idx=case(
                by_leg, value=PositionCloseLeg.leg, else_=PositionCloseLeg.position_idx
            )
        )
        .execution_options(synchronize_session=False)
    )


async def get_trades(session: AsyncSession, position_id: uuid.UUID) -> Sequence[Trade]:
    result = await session.execute(
        select(Trade).where(Trade.position_id == position_id).order_by(Trade.leg)
    )
    return result.scalars().all()


async def get_trades_of(
    session: AsyncSession, position_ids: Sequence[uuid.UUID]
) -> Sequence[Trade]:
    return await rows_of(session, Trade, position_ids, Trade.leg)


async def get_components_of(
    session: AsyncSession, position_ids: Sequence[uuid.UUID]
) -> Sequence[PositionComponent]:
    return await rows_of(
        session,
        PositionComponent,
        position_ids,
        PositionComponent.created_at,
        PositionComponent.symbol,
    )


async def record_trade(session: AsyncSession, values: dict[str, object]) -> bool:
    """Insert a fill once; a second report of the same orderLinkId changes nothing (False).
    Leaves `updated_at` alone: the caller moves it (`mark_changed`, or reconciliation's
    bookmark)."""
    result = await session.execute(
        insert(Trade)
        .values(id=uuid.uuid4(), **values)
        .on_conflict_do_nothing(index_elements=[Trade.order_link_id])
        .returning(Trade.id)
    )
    return result.scalar_one_or_none() is not None


async def get_components(
    session: AsyncSession, position_id: uuid.UUID
) -> Sequence[PositionComponent]:
    result = await session.execute(
        select(PositionComponent)
        .where(PositionComponent.position_id == position_id)
        .order_by(PositionComponent.created_at, PositionComponent.symbol)
    )
    return result.scalars().all()


def _unclaimed() -> ColumnElement[bool]:
    """Waiting for a task to take it: a new basket, or a close not claimed yet."""
    return (SyntheticPosition.status == PositionStatus.PENDING) | (
        (SyntheticPosition.status == PositionStatus.CLOSING) & SyntheticPosition.claim.is_(None)
    )


async def stale_pending(
    session: AsyncSession, *, older_than_seconds: float, limit: int
) -> Sequence[SyntheticPosition]:
    """PENDING positions, and CLOSING ones no task has claimed, not sent on for a while."""
    older_than = func.now() - timedelta(seconds=older_than_seconds)
    result = await session.execute(
        select(SyntheticPosition)
        .where(
            _unclaimed(),
            SyntheticPosition.updated_at < older_than,
            # One waiting for its account asks again by itself (and shows it in heartbeat_at);
            # re-sending it would only add a second chain of messages.
            SyntheticPosition.account_wait_since.is_(None)
            | (SyntheticPosition.heartbeat_at < older_than),
        )
        .order_by(SyntheticPosition.updated_at)
        .limit(limit)
    )
    return result.scalars().all()


async def stale_executing(
    session: AsyncSession, *, older_than_seconds: float, limit: int
) -> Sequence[SyntheticPosition]:
    """EXECUTING positions, and claimed CLOSING ones, with no recent heartbeat and no retry
    due in the future."""
    older_than = func.now() - timedelta(seconds=older_than_seconds)
    result = await session.execute(
        select(SyntheticPosition)
        .where(
            (SyntheticPosition.status == PositionStatus.EXECUTING)
            | (
                (SyntheticPosition.status == PositionStatus.CLOSING)
                & SyntheticPosition.claim.is_not(None)
            ),
            SyntheticPosition.heartbeat_at < older_than,
            (SyntheticPosition.next_attempt_at.is_(None))
            | (SyntheticPosition.next_attempt_at < older_than),
        )
        .order_by(SyntheticPosition.heartbeat_at)
        .limit(limit)
    )
    return result.scalars().all()


async def touch_pending(session: AsyncSession, position_id: uuid.UUID) -> None:
    """Restart an unclaimed position's staleness clock after it has been re-sent."""
    await session.execute(
        update(SyntheticPosition)
        .where(SyntheticPosition.id == position_id, _unclaimed())
        .values(updated_at=func.clock_timestamp())
        .execution_options(synchronize_session=False)
    )


async def count_by_status(session: AsyncSession) -> dict[str, int]:
    result = await session.execute(
        select(SyntheticPosition.status, func.count()).group_by(SyntheticPosition.status)
    )
    return {status: int(count) for status, count in result.all()}


async def get_close_plan(
    session: AsyncSession, position_id: uuid.UUID, round_: int
) -> Sequence[PositionCloseLeg]:
    result = await session.execute(
        select(PositionCloseLeg)
        .where(PositionCloseLeg.position_id == position_id, PositionCloseLeg.round == round_)
        .order_by(PositionCloseLeg.leg)
    )
    return result.scalars().all()


async def get_close_plans_of(
    session: AsyncSession, position_ids: Sequence[uuid.UUID]
) -> Sequence[PositionCloseLeg]:
    return await rows_of(
        session,
        PositionCloseLeg,
        position_ids,
        PositionCloseLeg.position_id,
        PositionCloseLeg.round,
        PositionCloseLeg.leg,
    )


async def add_close_plan(
    session: AsyncSession, legs: Sequence[dict[str, object]]
) -> Sequence[PositionCloseLeg]:
    """Insert a close round's legs; returns them as stored, in leg order."""
    if not legs:
        return []
    result = await session.scalars(insert(PositionCloseLeg).returning(PositionCloseLeg), list(legs))
    return sorted(result.all(), key=lambda leg: leg.leg)


async def fail_close_leg(
    session: AsyncSession, position_id: uuid.UUID, round_: int, leg: int, error: str
) -> None:
    """A close round's leg could not be closed: it is not tried again in this round."""
    await _update_close_leg(session, position_id, round_, leg, error=error)


async def set_closed_elsewhere(
    session: AsyncSession, position_id: uuid.UUID, round_: int, leg: int, quantity: Decimal
) -> None:
    """The exchange no longer held `quantity` of the leg: the round does not sell it."""
    await _update_close_leg(
        session, position_id, round_, leg, closed_elsewhere=quantity, error=None
    )


async def _update_close_leg(
    session: AsyncSession, position_id: uuid.UUID, round_: int, leg: int, **values: object
) -> None:
    """Write what a close round found of one leg; GET shows it (updated_at moves)."""
    await session.execute(
        update(PositionCloseLeg)
        .where(
            PositionCloseLeg.position_id == position_id,
            PositionCloseLeg.round == round_,
            PositionCloseLeg.leg == leg,
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    await mark_changed(session, position_id, run_alive=True)


async def mark_refused(
    session: AsyncSession, position_id: uuid.UUID, leg: int, close_round: int | None
) -> None:
    """The leg's first order (the opening's, or close round `close_round`'s) was refused
    outright: it is not on the exchange."""
    table = PositionLeg if close_round is None else PositionCloseLeg
    conditions = [table.position_id == position_id, table.leg == leg]
    if close_round is not None:
        conditions.append(PositionCloseLeg.round == close_round)
    await session.execute(
        update(table)
        .where(*conditions)
        .values(refused_at=func.now())
        .execution_options(synchronize_session=False)
    )


async def unmark_submitted(
    session: AsyncSession,
    position_id: uuid.UUID,
    leg: int,
    close_round: int | None,
    lock_pid: int,
) -> None:
    """The leg's first order was marked submitted ahead of time and then certainly not sent
    (the leg before it failed): withdraw the mark, written only while the run (`lock_pid`)
    still holds the position."""
    table = PositionLeg if close_round is None else PositionCloseLeg
    conditions = [table.position_id == position_id, table.leg == leg, table.refused_at.is_(None)]
    if close_round is not None:
        conditions.append(PositionCloseLeg.round == close_round)
    await session.execute(
        update(table)
        .where(*conditions, lock_held_by(position_id, lock_pid))
        .values(submitted_at=None)
        .execution_options(synchronize_session=False)
    )


async def add_close_request(
    session: AsyncSession, position_id: uuid.UUID, idempotency_key: str
) -> None:
    """Note the Idempotency-Key of a close request, with the round it begins (the next one:
    written in the same transaction as the change to CLOSING)."""
    await session.execute(
        insert(PositionCloseRequest).values(
            position_id=position_id,
            idempotency_key=idempotency_key,
            round=select(SyntheticPosition.close_round + 1)
            .where(SyntheticPosition.id == position_id)
            .scalar_subquery(),
        )
    )


async def get_close_request(
    session: AsyncSession, position_id: uuid.UUID, idempotency_key: str
) -> PositionCloseRequest | None:
    return await session.get(PositionCloseRequest, (position_id, idempotency_key))
