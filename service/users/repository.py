from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from service.models import ApiToken, PositionStatus, SyntheticPosition, User


async def get_user_by_email(session: AsyncSession, email: str) -> User | None:
    result = await session.execute(select(User).where(User.email == email))
    return result.scalar_one_or_none()


async def add_user(session: AsyncSession, email: str) -> User:
    user = User(id=uuid.uuid4(), email=email)
    session.add(user)
    await session.flush()
    return user


async def add_token(
    session: AsyncSession, user_id: uuid.UUID, token_hash: str, *, ttl_seconds: float
) -> ApiToken:
    """A new token, expiring `ttl_seconds` after the database's now (one clock for issuing
    and checking: the database's)."""
    token = ApiToken(
        id=uuid.uuid4(),
        user_id=user_id,
        token_hash=token_hash,
        expires_at=func.now() + timedelta(seconds=ttl_seconds),
    )
    session.add(token)
    await session.flush()
    await session.refresh(token)
    return token


async def get_token_owner(session: AsyncSession, token_hash: str) -> tuple[User, bool] | None:
    """The owner of a token not revoked, and whether it has expired (by the database's
    clock); None when no such token, or it was revoked."""
    result = await session.execute(
        select(User, ApiToken.expires_at <= func.now())
        .join(ApiToken, ApiToken.user_id == User.id)
        .where(ApiToken.token_hash == token_hash, ApiToken.revoked_at.is_(None))
    )
    row = result.one_or_none()
    if row is None:
        return None
    return row[0], bool(row[1])


async def get_user_by_token_hash(session: AsyncSession, token_hash: str) -> User | None:
    """The owner of a live token: not revoked, not expired."""
    result = await session.execute(
        select(User)
        .join(ApiToken, ApiToken.user_id == User.id)
        .where(
            ApiToken.token_hash == token_hash,
            ApiToken.revoked_at.is_(None),
            ApiToken.expires_at > func.now(),
        )
    )
    return result.scalar_one_or_none()


async def list_tokens(session: AsyncSession, user_id: uuid.UUID) -> Sequence[ApiToken]:
    result = await session.execute(
        select(ApiToken)
        .where(ApiToken.user_id == user_id)
        .order_by(ApiToken.created_at, ApiToken.id)
    )
    return result.scalars().all()


async def revoke_tokens(session: AsyncSession, user_id: uuid.UUID) -> int:
    result = await session.execute(
        update(ApiToken)
        .where(ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=func.now())
        .returning(ApiToken.id)
    )
    return len(result.scalars().all())


async def revoke_token(
    session: AsyncSession, token_id: uuid.UUID, *, user_id: uuid.UUID | None = None
) -> datetime | None:
    """Revoke one token (of `user_id` only, when given); its revocation time, the earlier
    one if it was revoked already. None when there is no such token (of that user)."""
    conditions = [ApiToken.id == token_id]
    if user_id is not None:
        conditions.append(ApiToken.user_id == user_id)
    result = await session.execute(
        update(ApiToken)
        .where(*conditions)
        .values(revoked_at=func.coalesce(ApiToken.revoked_at, func.now()))
        .returning(ApiToken.revoked_at)
    )
    return result.scalar_one_or_none()


async def pending_positions(session: AsyncSession, user_id: uuid.UUID) -> Sequence[uuid.UUID]:
    result = await session.execute(
        select(SyntheticPosition.id)
        .where(
            SyntheticPosition.user_id == user_id,
            SyntheticPosition.status == PositionStatus.PENDING,
        )
        .order_by(SyntheticPosition.created_at)
    )
    return result.scalars().all()
