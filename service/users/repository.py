from __future__ import annotations

import uuid

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from service.models import ApiToken, User


async def get_user_by_email(session: AsyncSession, email: str) -> User | None:
    result = await session.execute(select(User).where(User.email == email))
    return result.scalar_one_or_none()


async def add_user(session: AsyncSession, email: str) -> User:
    user = User(id=uuid.uuid4(), email=email)
    session.add(user)
    await session.flush()
    return user


async def add_token(session: AsyncSession, user_id: uuid.UUID, token_hash: str) -> ApiToken:
    token = ApiToken(id=uuid.uuid4(), user_id=user_id, token_hash=token_hash)
    session.add(token)
    await session.flush()
    return token


async def get_user_by_token_hash(session: AsyncSession, token_hash: str) -> User | None:
    result = await session.execute(
        select(User)
        .join(ApiToken, ApiToken.user_id == User.id)
        .where(ApiToken.token_hash == token_hash, ApiToken.revoked_at.is_(None))
    )
    return result.scalar_one_or_none()


async def revoke_tokens(session: AsyncSession, user_id: uuid.UUID) -> int:
    result = await session.execute(
        update(ApiToken)
        .where(ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=func.now())
        .returning(ApiToken.id)
    )
    return len(result.scalars().all())
