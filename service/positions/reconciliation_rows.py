"""SQL of reconciliation: which positions are due, the bookmark (`reconciled_at`), and the
differences found."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import func, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from service.models import PositionStatus, ReconciliationIssue, SyntheticPosition
from service.positions.repository import rows_of


async def unreconciled_positions(
    session: AsyncSession,
    *,
    window_seconds: float,
    settle_seconds: float,
    limit: int,
    statuses: Sequence[PositionStatus],
    after: tuple[datetime, uuid.UUID] | None = None,
) -> Sequence[SyntheticPosition]:
    """Positions in `statuses` (of those that may have orders on the exchange: all but
    PENDING) that changed since they were last reconciled, between `window_seconds` and
    `settle_seconds` ago, oldest change first; `after` is the (updated_at, id) of the last row
    of the previous page."""
    query = select(SyntheticPosition).where(
        SyntheticPosition.status != PositionStatus.PENDING,
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
    marked = result.scalar_one_or_none() is not None
    if changed and not marked:
        # Moved meanwhile, but what was recorded here (a fill, an issue) must still move the
        # ETag, or a 304 or a body kept for the old tag would hide it.
        await session.execute(
            update(SyntheticPosition)
            .where(SyntheticPosition.id == position_id)
            .values(updated_at=func.clock_timestamp())
            .execution_options(synchronize_session=False)
        )
    return marked


async def add_reconciliation_issue(session: AsyncSession, values: dict[str, object]) -> bool:
    """Record a difference once: the same kind for the same leg is not recorded again."""
    result = await session.execute(
        insert(ReconciliationIssue)
        .values(id=uuid.uuid4(), **values)
        .on_conflict_do_nothing(index_elements=["order_link_id", "kind"])
        .returning(ReconciliationIssue.id)
    )
    return result.scalar_one_or_none() is not None


async def get_reconciliation_issues_of(
    session: AsyncSession, position_ids: Sequence[uuid.UUID]
) -> Sequence[ReconciliationIssue]:
    return await rows_of(session, ReconciliationIssue, position_ids, ReconciliationIssue.created_at)


async def get_reconciliation_issues(
    session: AsyncSession, position_id: uuid.UUID
) -> Sequence[ReconciliationIssue]:
    result = await session.execute(
        select(ReconciliationIssue)
        .where(ReconciliationIssue.position_id == position_id)
        .order_by(ReconciliationIssue.created_at)
    )
    return result.scalars().all()
