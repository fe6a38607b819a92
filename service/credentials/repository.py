from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from service.models import ExchangeCredential


async def get_credential(session: AsyncSession, user_id: uuid.UUID) -> ExchangeCredential | None:
    return await session.get(ExchangeCredential, user_id)


async def upsert_credential(
    session: AsyncSession,
    user_id: uuid.UUID,
    *,
    api_key_encrypted: str,
    api_secret_encrypted: str,
    api_key_hint: str,
) -> None:
    values = {
        "api_key_encrypted": api_key_encrypted,
        "api_secret_encrypted": api_secret_encrypted,
        "api_key_hint": api_key_hint,
    }
    await session.execute(
        insert(ExchangeCredential)
        .values(user_id=user_id, **values)
        .on_conflict_do_update(
            index_elements=[ExchangeCredential.user_id],
            set_={**values, "updated_at": func.now()},
        )
    )


async def delete_credential(session: AsyncSession, user_id: uuid.UUID) -> bool:
    result = await session.execute(
        delete(ExchangeCredential)
        .where(ExchangeCredential.user_id == user_id)
        .returning(ExchangeCredential.user_id)
    )
    return result.scalar_one_or_none() is not None


async def credential_user_ids(session: AsyncSession) -> Sequence[uuid.UUID]:
    result = await session.execute(select(ExchangeCredential.user_id))
    return result.scalars().all()


async def lock_credential(session: AsyncSession, user_id: uuid.UUID) -> ExchangeCredential | None:
    """The row, locked against a concurrent PUT until the transaction ends."""
    result = await session.execute(
        select(ExchangeCredential).where(ExchangeCredential.user_id == user_id).with_for_update()
    )
    return result.scalar_one_or_none()
