"""Users and their bearer tokens (stored only as hashes)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from service.errors import AuthenticationError, NotFoundError, ValidationError
from service.models import User
from service.security import generate_token, hash_token
from service.users import repository


@dataclass(frozen=True, slots=True)
class NewToken:
    user: User
    token: str  # shown once; only its hash is stored


def normalise_email(email: str) -> str:
    cleaned = email.strip().lower()
    local, _, domain = cleaned.partition("@")
    if not local or "." not in domain or len(cleaned) > 320 or " " in cleaned:
        raise ValidationError(f"not an email address: {email!r}")
    return cleaned


async def create_user_with_token(session: AsyncSession, email: str) -> NewToken:
    """Create the user if new, and issue a fresh token either way."""
    address = normalise_email(email)
    user = await repository.get_user_by_email(session, address)
    if user is None:
        user = await repository.add_user(session, address)
    token = generate_token()
    await repository.add_token(session, user.id, hash_token(token))
    return NewToken(user=user, token=token)


async def authenticate(session: AsyncSession, token: str | None) -> User:
    if not token:
        raise AuthenticationError("missing bearer token: send 'Authorization: Bearer <token>'")
    user = await repository.get_user_by_token_hash(session, hash_token(token))
    if user is None:
        raise AuthenticationError("invalid or revoked token")
    return user


async def revoke_user_tokens(session: AsyncSession, email: str) -> int:
    """Revoke every token of the user; requests with them get 401 from now on."""
    user = await repository.get_user_by_email(session, normalise_email(email))
    if user is None:
        raise NotFoundError(f"no user {email!r}")
    return await repository.revoke_tokens(session, user.id)
