"""Users and their bearer tokens (stored only as hashes; each expires TOKEN_TTL_SECONDS after
it was issued, and can be revoked on its own or with all of its user's)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from service.config import get_settings
from service.db import SessionScope
from service.errors import AuthenticationError, NotFoundError, ValidationError
from service.models import ApiToken, User
from service.security import generate_token, hash_token
from service.users import repository


@dataclass(frozen=True, slots=True)
class NewToken:
    user: User
    token: str  # shown once; only its hash is stored
    token_id: uuid.UUID
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What may be shown of a token: never the token, never its hash."""

    id: uuid.UUID
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None

    @classmethod
    def of(cls, token: ApiToken) -> TokenInfo:
        return cls(token.id, token.created_at, token.expires_at, token.revoked_at)


def normalise_email(email: str) -> str:
    cleaned = email.strip().lower()
    local, _, domain = cleaned.partition("@")
    if not local or "." not in domain or len(cleaned) > 320 or " " in cleaned:
        raise ValidationError(f"not an email address: {email!r}")
    return cleaned


async def create_user_with_token(
    session: AsyncSession, email: str, *, ttl_seconds: float | None = None
) -> NewToken:
    """Create the user if new, and issue a fresh token either way (expiring TOKEN_TTL_SECONDS
    from now, or `ttl_seconds`)."""
    address = normalise_email(email)
    user = await repository.get_user_by_email(session, address)
    if user is None:
        user = await repository.add_user(session, address)
    token = generate_token()
    ttl = get_settings().token_ttl_seconds if ttl_seconds is None else ttl_seconds
    stored = await repository.add_token(session, user.id, hash_token(token), ttl_seconds=ttl)
    return NewToken(user=user, token=token, token_id=stored.id, expires_at=stored.expires_at)


async def authenticate(session: AsyncSession, token: str | None) -> User:
    if not token:
        raise AuthenticationError("missing bearer token: send 'Authorization: Bearer <token>'")
    found = await repository.get_token_owner(session, hash_token(token))
    if found is None:
        raise AuthenticationError("invalid or revoked token")
    user, expired = found
    if expired:
        raise AuthenticationError("token expired: ask for a new one")
    return user


async def _user(session: AsyncSession, email: str) -> User:
    user = await repository.get_user_by_email(session, normalise_email(email))
    if user is None:
        raise NotFoundError(f"no user {email!r}")
    return user


async def list_user_tokens(session: AsyncSession, email: str) -> list[TokenInfo]:
    """Every token of the user, oldest first, live or not."""
    user = await _user(session, email)
    return [TokenInfo.of(t) for t in await repository.list_tokens(session, user.id)]


async def list_own_tokens(session: AsyncSession, user: User) -> list[TokenInfo]:
    return [TokenInfo.of(t) for t in await repository.list_tokens(session, user.id)]


async def revoke_user_tokens(session: AsyncSession, email: str) -> int:
    """Revoke every token of the user; requests with them get 401 from now on."""
    user = await _user(session, email)
    return await repository.revoke_tokens(session, user.id)


async def revoke_token(
    session: AsyncSession, token_id: uuid.UUID, *, user: User | None = None
) -> datetime:
    """Revoke one token (one of `user`'s, when given: another user's is as absent as a
    missing one). Revoking a revoked token again changes nothing."""
    revoked_at = await repository.revoke_token(
        session, token_id, user_id=user.id if user is not None else None
    )
    if revoked_at is None:
        raise NotFoundError(f"token {token_id} not found")
    return revoked_at


async def revoke_user(sessions: SessionScope, email: str) -> tuple[User, int]:
    """Revoke every token of the user, committed before this returns (nothing new can be
    queued with them): the user, and how many tokens were live."""
    async with sessions() as session:
        user = await _user(session, email)
        revoked = await repository.revoke_tokens(session, user.id)
    return user, revoked
