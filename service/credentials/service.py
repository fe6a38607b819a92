"""A user's Bybit key pair: sealed at rest (the API seals, only a worker opens: see
service/security.py), shown masked."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from service.bybit.auth import ApiCredentials
from service.credentials import repository
from service.db import SessionScope
from service.errors import NotFoundError, ValidationError
from service.security import (
    CredentialDecryptionError,
    CredentialOpener,
    CredentialSealer,
    mask_key,
)

_PRINTABLE = re.compile(r"^[\x21-\x7e]{8,128}$")


@dataclass(frozen=True, slots=True)
class CredentialView:
    api_key: str  # masked
    updated_at: datetime


async def store_credentials(
    session: AsyncSession,
    sealer: CredentialSealer,
    user_id: uuid.UUID,
    *,
    api_key: str,
    api_secret: str,
) -> None:
    for name, value in (("api_key", api_key), ("api_secret", api_secret)):
        if not _PRINTABLE.match(value):
            raise ValidationError(f"{name} must be 8 to 128 printable characters without spaces")
    await repository.upsert_credential(
        session,
        user_id,
        api_key_encrypted=sealer.seal(api_key),
        api_secret_encrypted=sealer.seal(api_secret),
        api_key_hint=mask_key(api_key),
    )


async def view_credentials(session: AsyncSession, user_id: uuid.UUID) -> CredentialView:
    row = await repository.get_credential(session, user_id)
    if row is None:
        raise NotFoundError("no Bybit credentials stored: PUT /api/credentials first")
    return CredentialView(api_key=row.api_key_hint, updated_at=row.updated_at)


async def has_credentials(session: AsyncSession, user_id: uuid.UUID) -> bool:
    return await repository.get_credential(session, user_id) is not None


async def delete_credentials(session: AsyncSession, user_id: uuid.UUID) -> None:
    if not await repository.delete_credential(session, user_id):
        raise NotFoundError("no Bybit credentials stored")


async def load_decrypted(
    session: AsyncSession, opener: CredentialOpener, user_id: uuid.UUID
) -> ApiCredentials | None:
    """Open the pair for one exchange call. Only the worker can (it holds the opener)."""
    row = await repository.get_credential(session, user_id)
    if row is None:
        return None
    return decrypt_pair(opener, row.api_key_encrypted, row.api_secret_encrypted)


def decrypt_pair(
    opener: CredentialOpener, key_encrypted: str, secret_encrypted: str
) -> ApiCredentials:
    """A stored pair, opened (raises CredentialDecryptionError)."""
    return ApiCredentials(
        api_key=opener.open(key_encrypted), api_secret=opener.open(secret_encrypted)
    )


@dataclass(frozen=True, slots=True)
class RotationReport:
    rotated: int
    # Users whose stored pair no listed key opens: left as they are, for a person to see.
    unreadable: list[uuid.UUID]


async def rotate_all(sessions: SessionScope, opener: CredentialOpener) -> RotationReport:
    """Re-seal every stored pair for the opener's current key (the first private key's
    public key; in the legacy set-up, the first CREDENTIALS_KEYS key), one row per
    transaction, while the system runs (every worker opens with any listed key). Legacy Fernet
    rows are moved to sealed boxes the same way: the in-place migration. A row that no listed
    key opens is skipped and reported, not the end of the rotation."""
    async with sessions() as session:
        user_ids = await repository.credential_user_ids(session)
    rotated = 0
    unreadable: list[uuid.UUID] = []
    for user_id in user_ids:
        async with sessions() as session:
            row = await repository.lock_credential(session, user_id)
            if row is None:  # deleted meanwhile
                continue
            try:
                key = opener.reseal(row.api_key_encrypted)
                secret = opener.reseal(row.api_secret_encrypted)
            except CredentialDecryptionError:
                unreadable.append(user_id)
                continue
            row.api_key_encrypted, row.api_secret_encrypted = key, secret
            await session.flush()
            rotated += 1
    return RotationReport(rotated=rotated, unreadable=unreadable)
