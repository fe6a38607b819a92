from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from service.indices.catalogue import IndexDefinition
from service.models import Index, IndexComponent


async def list_indices(session: AsyncSession) -> Sequence[Index]:
    result = await session.execute(
        select(Index).options(selectinload(Index.components)).order_by(Index.code)
    )
    return result.scalars().all()


async def upsert_index(session: AsyncSession, definition: IndexDefinition) -> None:
    """Make the stored index equal to its definition (components replaced in one go)."""
    await session.execute(
        insert(Index)
        .values(code=definition.code, name=definition.name, description=definition.description)
        .on_conflict_do_update(
            index_elements=[Index.code],
            set_={"name": definition.name, "description": definition.description},
        )
    )
    await session.execute(
        delete(IndexComponent).where(IndexComponent.index_code == definition.code)
    )
    session.add_all(
        IndexComponent(
            index_code=definition.code, symbol=c.symbol, weight=c.weight, ordinal=ordinal
        )
        for ordinal, c in enumerate(definition.components)
    )
    await session.flush()


async def component_symbols(session: AsyncSession) -> Sequence[str]:
    result = await session.execute(select(IndexComponent.symbol).distinct())
    return result.scalars().all()
