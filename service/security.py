"""Credential encryption (MultiFernet over CREDENTIALS_KEYS) and API token hashing."""

from __future__ import annotations

import hashlib
import secrets

from cryptography.fernet import Fernet, InvalidToken, MultiFernet


class CredentialsKeyError(ValueError):
    """CREDENTIALS_KEYS is missing or holds something that is not a Fernet key."""


class CredentialDecryptionError(Exception):
    """A stored credential cannot be decrypted with any configured key."""


class CredentialCipher:
    """Encrypts with the first key, decrypts with any of them (key rotation)."""

    def __init__(self, keys: str) -> None:
        parts = [part.strip() for part in keys.split(",") if part.strip()]
        if not parts:
            raise CredentialsKeyError("CREDENTIALS_KEYS must hold at least one Fernet key")
        fernets = []
        for position, part in enumerate(parts, start=1):
            try:
                fernets.append(Fernet(part.encode()))
            except (ValueError, TypeError) as exc:
                # The key itself must not appear in the message.
                raise CredentialsKeyError(
                    f"CREDENTIALS_KEYS entry {position} is not a valid Fernet key "
                    "(32 url-safe base64-encoded bytes)"
                ) from exc
        self._fernet = MultiFernet(fernets)

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, ciphertext: str) -> str:
        try:
            return self._fernet.decrypt(ciphertext.encode()).decode()
        except InvalidToken as exc:
            raise CredentialDecryptionError(
                "stored credential cannot be decrypted with any key in CREDENTIALS_KEYS"
            ) from exc

    def rotate(self, ciphertext: str) -> str:
        """Re-encrypt with the first key."""
        try:
            return self._fernet.rotate(ciphertext.encode()).decode()
        except InvalidToken as exc:
            raise CredentialDecryptionError(
                "stored credential cannot be decrypted with any key in CREDENTIALS_KEYS"
            ) from exc


def generate_fernet_key() -> str:
    return Fernet.generate_key().decode()


def mask_key(api_key: str) -> str:
    """Enough to recognise a key, never enough to use it."""
    if len(api_key) <= 8:
        return "*" * len(api_key)
    return f"{api_key[:4]}…{api_key[-4:]}"


TOKEN_PREFIX = "sit_"  # noqa: S105  # a public prefix that makes leaked tokens greppable


def generate_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    # Tokens carry 256 bits of entropy, so a plain SHA-256 is the right hash: no salt or
    # slow KDF needed, and the lookup stays one indexed equality.
    return hashlib.sha256(token.encode()).hexdigest()
