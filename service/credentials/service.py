"""A user's Bybit key pair: encrypted at rest, shown masked, decrypted only in the worker."""

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
from service.security import CredentialCipher, CredentialDecryptionError, mask_key

_PRINTABLE = re.compile(r"^[\x21-\x7e]{8,128}$")


@dataclass(frozen=True, slots=True)
class CredentialView:
    api_key: str  # masked
    updated_at: datetime


async def store_credentials(
    session: AsyncSession,
    cipher: CredentialCipher,
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
        api_key_encrypted=cipher.encrypt(api_key),
        api_secret_encrypted=cipher.encrypt(api_secret),
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
    session: AsyncSession, cipher: CredentialCipher, user_id: uuid.UUID
) -> ApiCredentials | None:
    """Decrypt the pair for one exchange call. Only the worker calls this."""
    row = await repository.get_credential(session, user_id)
    if row is None:
        return None
    return decrypt_pair(cipher, row.api_key_encrypted, row.api_secret_encrypted)


def decrypt_pair(
    cipher: CredentialCipher, key_encrypted: str, secret_encrypted: str
) -> ApiCredentials:
    """A stored pair, decrypted (raises CredentialDecryptionError)."""
    return ApiCredentials(
        api_key=cipher.decrypt(key_encrypted), api_secret=cipher.decrypt(secret_encrypted)
    )


@dataclass(frozen=True, slots=True)
class RotationReport:
    rotated: int
    # Users whose stored pair no listed key decrypts: left as they are, for a person to see.
    unreadable: list[uuid.UUID]


async def rotate_all(sessions: SessionScope, cipher: CredentialCipher) -> RotationReport:
    """Re-encrypt every stored pair with the first CREDENTIALS_KEYS key, one row per
    transaction, while the system runs (every process decrypts with any listed key). A row
    that no listed key decrypts is skipped and reported, not the end of the rotation."""
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
                key = cipher.rotate(row.api_key_encrypted)
                secret = cipher.rotate(row.api_secret_encrypted)
            except CredentialDecryptionError:
                unreadable.append(user_id)
                continue
            row.api_key_encrypted, row.api_secret_encrypted = key, secret
            await session.flush()
            rotated += 1
    return RotationReport(rotated=rotated, unreadable=unreadable)
