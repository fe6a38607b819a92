"""SQL for positions, their plan, trades and snapshot. Every status change is one
compare-and-set UPDATE ... WHERE status = ... RETURNING, never read-then-write."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import Decimal

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
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.sql.elements import TextClause

from service.models import (
    ExchangeCredential,
    PositionComponent,
    PositionLeg,
    PositionStatus,
    ReconciliationIssue,
    SyntheticPosition,
    Trade,
)

LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of a lock not granted within lock_timeout


def advisory_lock_key(position_id: uuid.UUID) -> int:
    """A signed 64-bit key for PostgreSQL's advisory locks, derived from the position id."""
    return int.from_bytes(position_id.bytes[:8], "big", signed=True)


def _lock_params(position_id: uuid.UUID) -> dict[str, int]:
    # pg_locks shows a bigint advisory key as two oids: its high and low 32 bits.
    key = advisory_lock_key(position_id)
    return {"lock_high": (key >> 32) & 0xFFFFFFFF, "lock_low": key & 0xFFFFFFFF}


_LOCK_HELD = (
    "EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
    " AND classid::bigint = :lock_high AND objid::bigint = :lock_low{holder})"
)


# The run's ownership proof (confirm_run), on its lock connection: lock, status and claim.
_CONFIRM_RUN = (
    "WITH owner AS ("  # noqa: S608 - constants only; every value is a bound parameter
    " UPDATE synthetic_positions SET heartbeat_at = now()"
    " WHERE id = :id AND status = 'EXECUTING' AND claim = :claim AND "
    + _LOCK_HELD.format(holder=" AND pid = pg_backend_pid()")
    + " RETURNING id), "
    "submitted AS ("
    " UPDATE position_legs SET submitted_at = coalesce(submitted_at, now()),"
    " remainders_submitted = greatest(remainders_submitted, CAST(:remainder AS integer))"
    " WHERE position_id IN (SELECT id FROM owner) AND leg = CAST(:leg AS integer)"
    " RETURNING leg) "
    "SELECT count(*) FROM owner"
)


def lock_held_by(position_id: uuid.UUID, pid: int) -> TextClause:
    """A condition: the position's run lock is held by backend `pid` (the run's lock
    connection). A status write with it cannot be made by a run that lost its lock."""
    return text(_LOCK_HELD.format(holder=" AND pid = :lock_pid")).bindparams(
        lock_pid=pid, **_lock_params(position_id)
    )


async def try_advisory_lock(connection: AsyncConnection, position_id: uuid.UUID) -> int | None:
    """Take the position's session-level lock, held by the connection until released or the
    connection dies. Returns the connection's backend pid (what its status writes are fenced
    with), or None when another connection holds the lock."""
    result = await connection.execute(
        text("SELECT pg_try_advisory_lock(:key), pg_backend_pid()"),
        {"key": advisory_lock_key(position_id)},
    )
    acquired, pid = result.one()
    return int(pid) if acquired else None


async def advisory_unlock(connection: AsyncConnection, position_id: uuid.UUID) -> None:
    await connection.execute(
        text("SELECT pg_advisory_unlock(:key)"), {"key": advisory_lock_key(position_id)}
    )


def account_lock_keys(user_id: uuid.UUID) -> tuple[int, int]:
    """The two-int advisory lock key of a user's exchange account (the service keeps one
    Bybit key per user, so a user is an account, whichever key it stores at the moment).

    PostgreSQL keeps two-int keys apart from the bigint keys of positions (`objsubid` 2
    against 1), so an account's lock can never collide with a position's."""
    raw = user_id.bytes[:8]
    return (
        int.from_bytes(raw[:4], "big", signed=True),
        int.from_bytes(raw[4:], "big", signed=True),
    )


async def lock_account(
    connection: AsyncConnection, user_id: uuid.UUID, *, wait_seconds: float = 0.0
) -> bool:
    """Take the account's session-level lock: at once, or waiting in PostgreSQL's queue (first
    come, first served) at most `wait_seconds`. False when it was not granted. The connection
    must be in autocommit mode; the wait's lock_timeout is local to its one statement."""
    first, second = account_lock_keys(user_id)
    keys = {"first": first, "second": second}
    if wait_seconds <= 0:
        result = await connection.execute(
            text("SELECT pg_try_advisory_lock(:first, :second)"), keys
        )
        return bool(result.scalar_one())
    try:
        await connection.execute(
            text(
                "WITH wait AS MATERIALIZED (SELECT set_config('lock_timeout', :ms, true)) "
                "SELECT pg_advisory_lock(:first, :second) FROM wait"
            ),
            {**keys, "ms": str(max(1, int(wait_seconds * 1000)))},
        )
        return True
    except DBAPIError as error:
        if getattr(error.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
            raise
        return False


async def unlock_account(connection: AsyncConnection, user_id: uuid.UUID) -> None:
    first, second = account_lock_keys(user_id)
    await connection.execute(
        text("SELECT pg_advisory_unlock(:first, :second)"), {"first": first, "second": second}
    )


async def account_holder(
    session: AsyncSession, user_id: uuid.UUID, *, other_than: uuid.UUID
) -> SyntheticPosition | None:
    """Another basket of the account that has begun and not ended (EXECUTING): the account is
    its until it is final, between its retries too, so no other basket's pre-flight counts on
    a balance that basket still needs."""
    result = await session.execute(
        select(SyntheticPosition)
        .where(
            SyntheticPosition.user_id == user_id,
            SyntheticPosition.status == PositionStatus.EXECUTING,
            SyntheticPosition.id != other_than,
        )
        .order_by(SyntheticPosition.created_at)
        .limit(1)
    )
    return result.scalar_one_or_none()


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


async def confirm_run(
    connection: AsyncConnection,
    position_id: uuid.UUID,
    claim: str,
    *,
    submitting_leg: int | None = None,
    submitting_remainder: int = 0,
) -> bool:
    """One round trip on the connection that holds the run's lock: True when this connection
    still holds the position's lock and the position is still EXECUTING under `claim`. Then
    the heartbeat is renewed (the recovery sweep waits STALE_EXECUTING_SECONDS after it before
    it may resume the position elsewhere) and `submitting_leg`'s order (its first, or
    remainder number `submitting_remainder`), if given, is marked submitted (before it is
    sent: a later run looks it up before placing anything)."""
    result = await connection.execute(
        text(_CONFIRM_RUN),
        {
            "id": position_id,
            "claim": claim,
            "leg": submitting_leg,
            "remainder": submitting_remainder,
            **_lock_params(position_id),
        },
    )
    return bool(result.scalar_one())


async def is_run_alive(session: AsyncSession, position_id: uuid.UUID) -> bool:
    """True when some connection holds the position's run lock (a run is in progress).

    Read from pg_locks rather than by trying the lock: taking it, even for an instant, would
    turn away a run that starts at that moment."""
    this_database = (
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    result = await session.execute(
        text("SELECT " + _LOCK_HELD.format(holder=this_database)), _lock_params(position_id)
    )
    return bool(result.scalar_one())


async def add_position(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    index_code: str,
    size: Decimal,
    direction: str,
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
    error: str | None = None,
    failed_leg: int | None = None,
) -> SyntheticPosition | None:
    """Move a position from `expected` to `new`; None when it was not in `expected` (or not
    under `require_claim`, or its run lock is not held by backend `lock_pid`)."""
    conditions: list[ColumnElement[bool] | TextClause] = [
        SyntheticPosition.id == position_id,
        SyntheticPosition.status == expected,
    ]
    if require_claim is not None:
        conditions.append(SyntheticPosition.claim == require_claim)
    if lock_pid is not None:
        conditions.append(lock_held_by(position_id, lock_pid))
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
    if new.is_final:
        values.update(next_attempt_at=None)
    if error is not None:
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


async def resume_claimed(
    session: AsyncSession, position_id: uuid.UUID, claim: str, *, lock_pid: int | None = None
) -> SyntheticPosition | None:
    """The claim holder continues an EXECUTING position (a retry or a redelivery)."""
    result = await session.execute(
        update(SyntheticPosition)
        .where(
            SyntheticPosition.id == position_id,
            SyntheticPosition.status == PositionStatus.EXECUTING,
            SyntheticPosition.claim == claim,
            *([lock_held_by(position_id, lock_pid)] if lock_pid is not None else []),
        )
        .values(
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
            SyntheticPosition.status.in_([PositionStatus.PENDING, PositionStatus.EXECUTING]),
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


async def touch_heartbeat(session: AsyncSession, position_id: uuid.UUID) -> None:
    await _touch(
        session, position_id, {"heartbeat_at": func.now()}, status=PositionStatus.EXECUTING
    )


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
            SyntheticPosition.status == PositionStatus.EXECUTING,
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


async def get_plans_of(
    session: AsyncSession, position_ids: Sequence[uuid.UUID]
) -> Sequence[PositionLeg]:
    result = await session.execute(
        select(PositionLeg)
        .where(PositionLeg.position_id.in_(position_ids))
        .order_by(PositionLeg.position_id, PositionLeg.leg)
    )
    return result.scalars().all()


async def add_plan(session: AsyncSession, legs: Sequence[PositionLeg]) -> None:
    session.add_all(legs)
    await session.flush()
    if legs:
        # GET shows the plan (its legs): move updated_at, which the ETag follows.
        await _touch(session, legs[0].position_id, {"updated_at": func.clock_timestamp()})


async def set_position_idx(
    session: AsyncSession, position_id: uuid.UUID, by_leg: dict[int, int]
) -> None:
    """The positionIdx each leg's orders are sent with (its symbol's position mode)."""
    if not by_leg:
        return
    await session.execute(
        update(PositionLeg)
        .where(PositionLeg.position_id == position_id)
        .values(position_idx=case(by_leg, value=PositionLeg.leg, else_=PositionLeg.position_idx))
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
    result = await session.execute(
        select(Trade).where(Trade.position_id.in_(position_ids)).order_by(Trade.leg)
    )
    return result.scalars().all()


async def get_components_of(
    session: AsyncSession, position_ids: Sequence[uuid.UUID]
) -> Sequence[PositionComponent]:
    result = await session.execute(
        select(PositionComponent)
        .where(PositionComponent.position_id.in_(position_ids))
        .order_by(PositionComponent.created_at, PositionComponent.symbol)
    )
    return result.scalars().all()


async def record_trade(
    session: AsyncSession, values: dict[str, object], *, touch: bool = True
) -> bool:
    """Insert a fill once; a second report of the same orderLinkId changes nothing. With
    `touch`, a new fill moves `updated_at` (and the heartbeat); reconciliation moves
    `updated_at` itself, in the statement that marks the position reconciled."""
    result = await session.execute(
        insert(Trade)
        .values(id=uuid.uuid4(), **values)
        .on_conflict_do_nothing(index_elements=[Trade.order_link_id])
        .returning(Trade.id)
    )
    inserted = result.scalar_one_or_none() is not None
    if inserted and touch:
        # A new fill changes what GET shows: move updated_at, which the ETag follows.
        await _touch(
            session,
            values["position_id"],  # type: ignore[arg-type]
            {"updated_at": func.clock_timestamp(), "heartbeat_at": func.now()},
        )
    return inserted


async def get_components(
    session: AsyncSession, position_id: uuid.UUID
) -> Sequence[PositionComponent]:
    result = await session.execute(
        select(PositionComponent)
        .where(PositionComponent.position_id == position_id)
        .order_by(PositionComponent.created_at, PositionComponent.symbol)
    )
    return result.scalars().all()


async def add_components(session: AsyncSession, components: Sequence[PositionComponent]) -> None:
    session.add_all(components)
    await session.flush()


async def stale_pending(
    session: AsyncSession, *, older_than_seconds: float, limit: int
) -> Sequence[uuid.UUID]:
    older_than = func.now() - timedelta(seconds=older_than_seconds)
    result = await session.execute(
        select(SyntheticPosition.id)
        .where(
            SyntheticPosition.status == PositionStatus.PENDING,
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
    """EXECUTING positions with no recent heartbeat and no retry due in the future."""
    older_than = func.now() - timedelta(seconds=older_than_seconds)
    result = await session.execute(
        select(SyntheticPosition)
        .where(
            SyntheticPosition.status == PositionStatus.EXECUTING,
            SyntheticPosition.heartbeat_at < older_than,
            (SyntheticPosition.next_attempt_at.is_(None))
            | (SyntheticPosition.next_attempt_at < older_than),
        )
        .order_by(SyntheticPosition.heartbeat_at)
        .limit(limit)
    )
    return result.scalars().all()


async def touch_pending(session: AsyncSession, position_id: uuid.UUID) -> None:
    """Restart a PENDING position's staleness clock after it has been re-sent."""
    await _touch(
        session,
        position_id,
        {"updated_at": func.clock_timestamp()},
        status=PositionStatus.PENDING,
    )


async def unreconciled_positions(
    session: AsyncSession,
    *,
    window_seconds: float,
    settle_seconds: float,
    limit: int,
    statuses: Sequence[PositionStatus],
    after: tuple[datetime, uuid.UUID] | None = None,
) -> Sequence[SyntheticPosition]:
    """Positions in `statuses` (of those that may have legs on the exchange: EXECUTING,
    ACTIVE, FAILED) that changed since they were last reconciled, between `window_seconds` and
    `settle_seconds` ago, oldest change first; `after` is the (updated_at, id) of the last row
    of the previous page."""
    query = select(SyntheticPosition).where(
        SyntheticPosition.status.in_(
            [PositionStatus.EXECUTING, PositionStatus.ACTIVE, PositionStatus.FAILED]
        ),
        SyntheticPosition.status.in_(statuses),
        SyntheticPosition.reconciled_at.is_(None)
        | (SyntheticPosition.reconciled_at < SyntheticPosition.updated_at),
        SyntheticPosition.updated_at > func.now() - timedelta(seconds=window_seconds),
        SyntheticPosition.updated_at <= func.now() - timedelta(seconds=settle_seconds),
    )
    if after is not None:
        query = query.where(
            tuple_(SyntheticPosition.updated_at, SyntheticPosition.id) > tuple_(*after)
        )
    result = await session.execute(
        query.order_by(SyntheticPosition.updated_at, SyntheticPosition.id).limit(limit)
    )
    return result.scalars().all()


async def mark_reconciled(
    session: AsyncSession, position_id: uuid.UUID, *, seen: datetime, changed: bool
) -> bool:
    """Note that the position, as it was at `seen` (its updated_at), has been reconciled.
    `changed`: reconciliation recorded something GET shows, so updated_at (and the ETag) move
    too; otherwise they stay as they are. False when the position changed meanwhile: it is
    reconciled again later."""
    stamp = func.statement_timestamp()
    result = await session.execute(
        update(SyntheticPosition)
        .where(SyntheticPosition.id == position_id, SyntheticPosition.updated_at == seen)
        .values(
            reconciled_at=stamp,
            updated_at=stamp if changed else SyntheticPosition.updated_at,
        )
        .returning(SyntheticPosition.id)
        .execution_options(synchronize_session=False)
    )
    return result.scalar_one_or_none() is not None


async def add_reconciliation_issue(session: AsyncSession, values: dict[str, object]) -> bool:
    """Record a difference once: the same kind for the same leg is not recorded again."""
    result = await session.execute(
        insert(ReconciliationIssue)
        .values(id=uuid.uuid4(), **values)
        .on_conflict_do_nothing(index_elements=["order_link_id", "kind"])
        .returning(ReconciliationIssue.id)
    )
    return result.scalar_one_or_none() is not None


async def get_reconciliation_issues(
    session: AsyncSession, position_id: uuid.UUID
) -> Sequence[ReconciliationIssue]:
    result = await session.execute(
        select(ReconciliationIssue)
        .where(ReconciliationIssue.position_id == position_id)
        .order_by(ReconciliationIssue.created_at)
    )
    return result.scalars().all()


async def count_by_status(session: AsyncSession) -> dict[str, int]:
    result = await session.execute(
        select(SyntheticPosition.status, func.count()).group_by(SyntheticPosition.status)
    )
    return {status: int(count) for status, count in result.all()}
