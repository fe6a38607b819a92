"""Credentials at rest, and API token hashing.

A user's Bybit key and secret are sealed with the public key of a sealed box (PyNaCl's
`SealedBox`: X25519 + XSalsa20-Poly1305, an anonymous sender): the API holds only the public
key, so it can seal what a user sends and cannot open anything it stored. The workers hold the
private keys. A sealed value is `nacl1:<key id>:<base64>`, the key id being the first 8 hex
digits of the SHA-256 of the public key it was sealed for: an opener picks the private key at
once, and says which key is missing when it holds none that fits.

The contract's original scheme, a MultiFernet over CREDENTIALS_KEYS (symmetric: whoever
encrypts can decrypt), is the legacy one: values with no prefix are Fernet tokens, opened with
CREDENTIALS_KEYS; an API given only CREDENTIALS_KEYS still encrypts with it, as before.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
from dataclasses import dataclass
from typing import Protocol

import structlog
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from pydantic import SecretStr

from service.config import Settings

logger = structlog.stdlib.get_logger("service.security")

SEALED_PREFIX = "nacl1"
_KEY_BYTES = 32
_KEY_ID_HEX = 8


class CredentialsKeyError(ValueError):
    """A credentials key setting is missing, or holds something that is not a key."""


class CredentialDecryptionError(Exception):
    """A stored credential cannot be opened with any key this process holds."""


class CredentialSealer(Protocol):
    """What the API needs: turn a plaintext into what is stored."""

    def seal(self, plaintext: str) -> str: ...


def _parts(value: str | None) -> list[str]:
    """The comma-separated entries of a setting; an empty setting has none."""
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def _key_bytes(value: str, name: str) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != _KEY_BYTES:
        # The value itself must not appear in the message: it may be a private key.
        raise CredentialsKeyError(f"{name} is not a key (32 bytes in base64)")
    return raw


def key_id(public_key: PublicKey) -> str:
    """A short, public name of a key pair: what a sealed value says it was sealed for."""
    return hashlib.sha256(bytes(public_key)).hexdigest()[:_KEY_ID_HEX]


def parse_public_key(value: str) -> PublicKey:
    return PublicKey(_key_bytes(value.strip(), "CREDENTIALS_PUBLIC_KEY"))


def parse_private_keys(value: str | None) -> list[PrivateKey]:
    """CREDENTIALS_PRIVATE_KEYS: comma-separated, the first is current, all open."""
    return [
        PrivateKey(_key_bytes(part, f"CREDENTIALS_PRIVATE_KEYS entry {position}"))
        for position, part in enumerate(_parts(value), start=1)
    ]


def _legacy_fernet(keys: str | None) -> MultiFernet | None:
    """CREDENTIALS_KEYS as a MultiFernet (the first encrypts, all decrypt); None when unset."""
    fernets = []
    for position, part in enumerate(_parts(keys), start=1):
        try:
            fernets.append(Fernet(part.encode()))
        except (ValueError, TypeError):
            raise CredentialsKeyError(
                f"CREDENTIALS_KEYS entry {position} is not a valid Fernet key "
                "(32 url-safe base64-encoded bytes)"
            ) from None
    return MultiFernet(fernets) if fernets else None


class PublicKeySealer:
    """Seals for one public key; cannot open anything."""

    def __init__(self, public_key: PublicKey) -> None:
        self._box: SealedBox[PublicKey] = SealedBox(public_key)
        self.key_id = key_id(public_key)

    def seal(self, plaintext: str) -> str:
        sealed = base64.b64encode(self._box.encrypt(plaintext.encode())).decode()
        return f"{SEALED_PREFIX}:{self.key_id}:{sealed}"


class FernetSealer:
    """The legacy, symmetric scheme: encrypts with the first CREDENTIALS_KEYS key."""

    def __init__(self, fernet: MultiFernet) -> None:
        self._fernet = fernet

    def seal(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()


class CredentialOpener:
    """What a worker needs: opens values sealed for any listed private key, and legacy
    Fernet tokens with CREDENTIALS_KEYS. `seal` and `reseal` seal for the FIRST private key's
    public key (or, with no private key, encrypt with the first Fernet key: the legacy
    set-up's rotation)."""

    def __init__(self, private_keys: list[PrivateKey], legacy: MultiFernet | None = None) -> None:
        if not private_keys and legacy is None:
            raise CredentialsKeyError(
                "opening stored credentials needs CREDENTIALS_PRIVATE_KEYS "
                "(or, for rows of the legacy scheme, CREDENTIALS_KEYS)"
            )
        self._boxes: dict[str, SealedBox[PrivateKey]] = {
            key_id(key.public_key): SealedBox(key)
            for key in reversed(private_keys)  # the first wins a (freak) id collision
        }
        self._legacy = legacy
        self._sealer: CredentialSealer
        if private_keys:
            self._sealer = PublicKeySealer(private_keys[0].public_key)
        else:
            assert legacy is not None  # checked above: one of the two is set
            self._sealer = FernetSealer(legacy)
        self.key_ids = tuple(key_id(key.public_key) for key in private_keys)

    def open(self, ciphertext: str) -> str:
        if ciphertext.startswith(f"{SEALED_PREFIX}:"):
            return self._open_sealed(ciphertext)
        if self._legacy is None:
            raise CredentialDecryptionError(
                "stored credential is a legacy Fernet token and CREDENTIALS_KEYS is not set "
                "here (run `python -m service credentials rotate` with it to re-seal the rows)"
            )
        try:
            return self._legacy.decrypt(ciphertext.encode()).decode()
        except InvalidToken:
            raise CredentialDecryptionError(
                "stored credential cannot be decrypted with any key in CREDENTIALS_KEYS"
            ) from None

    def _open_sealed(self, ciphertext: str) -> str:
        _, sealed_for, payload = [*ciphertext.split(":", 2), "", ""][:3]
        opening = self._boxes.get(sealed_for)
        if opening is None:
            held = ", ".join(self._boxes) or "none"
            raise CredentialDecryptionError(
                f"stored credential is sealed for key {sealed_for or '?'}, which no key in "
                f"CREDENTIALS_PRIVATE_KEYS matches (keys held here: {held})"
            )
        try:
            return opening.decrypt(base64.b64decode(payload, validate=True)).decode()
        except (CryptoError, binascii.Error, ValueError):
            raise CredentialDecryptionError(
                f"stored credential sealed for key {sealed_for} is damaged: it does not open"
            ) from None

    def seal(self, plaintext: str) -> str:
        return self._sealer.seal(plaintext)

    def reseal(self, ciphertext: str) -> str:
        """Open, then seal for the current (first) key: a rotation's step."""
        return self._sealer.seal(self.open(ciphertext))


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def _check_pair(public_key: PublicKey | None, private_keys: list[PrivateKey]) -> None:
    """Where one process is given both, the public key must be one the private keys open:
    otherwise the API would seal for a key no worker holds."""
    if public_key is None or not private_keys:
        return
    if key_id(public_key) not in {key_id(key.public_key) for key in private_keys}:
        raise CredentialsKeyError(
            f"CREDENTIALS_PUBLIC_KEY (key {key_id(public_key)}) matches no key in "
            "CREDENTIALS_PRIVATE_KEYS: what it seals could not be opened"
        )


def sealer_from_settings(settings: Settings) -> CredentialSealer:
    """The API's sealer: the public key when set (Fernet never encrypts then), else the legacy
    CREDENTIALS_KEYS. Raises CredentialsKeyError when there is no way to seal, or when this
    process holds a key that opens besides the public key (private keys always; Fernet keys
    when a public key is set). With CREDENTIALS_KEYS alone (the legacy, symmetric set-up) it
    warns once that this process can decrypt."""
    public = settings.credentials_public_key
    public_key = parse_public_key(public) if public else None
    private_keys = parse_private_keys(_secret(settings.credentials_private_keys))
    legacy = _legacy_fernet(_secret(settings.credentials_keys))
    _check_pair(public_key, private_keys)
    decrypting = [
        name
        for name, held in (
            ("CREDENTIALS_PRIVATE_KEYS", bool(private_keys)),
            ("CREDENTIALS_KEYS", legacy is not None),
        )
        if held
    ]
    if private_keys or (decrypting and public_key is not None):
        # The API never opens a credential: a key that does has no business in it, and is
        # refused rather than merely warned about (code execution in the API would otherwise
        # expose every user's Bybit secret). The only exception is the legacy, symmetric
        # set-up below (CREDENTIALS_KEYS alone), which the contract keeps working.
        raise CredentialsKeyError(
            f"the API must not hold a key that opens stored credentials ({', '.join(decrypting)}"
            " is set, in the environment or .env): give it CREDENTIALS_PUBLIC_KEY only, and "
            "set the others empty for it (README, Credentials at rest)"
        )
    if decrypting:
        logger.warning(
            "credentials.api_holds_decryption_key",
            settings=decrypting,
            detail="this process can decrypt every stored Bybit key: give the API only "
            "CREDENTIALS_PUBLIC_KEY (see the README, Credentials at rest)",
        )
    if public_key is not None:
        return PublicKeySealer(public_key)
    if legacy is not None:
        return FernetSealer(legacy)
    raise CredentialsKeyError(
        "storing credentials needs CREDENTIALS_PUBLIC_KEY (`python -m service credentials "
        "keygen` makes a key pair), or the legacy CREDENTIALS_KEYS"
    )


def opener_from_settings(settings: Settings) -> CredentialOpener:
    """A worker's opener (and the `credentials rotate` command's). Raises CredentialsKeyError
    when this process cannot open anything."""
    private_keys = parse_private_keys(_secret(settings.credentials_private_keys))
    public = settings.credentials_public_key
    _check_pair(parse_public_key(public) if public else None, private_keys)
    return CredentialOpener(private_keys, _legacy_fernet(_secret(settings.credentials_keys)))


@dataclass(frozen=True, slots=True)
class KeyPair:
    private_key: str
    public_key: str
    key_id: str


def generate_key_pair() -> KeyPair:
    key = PrivateKey.generate()
    return KeyPair(
        private_key=base64.b64encode(bytes(key)).decode(),
        public_key=base64.b64encode(bytes(key.public_key)).decode(),
        key_id=key_id(key.public_key),
    )


def public_key_of(private_key: str) -> str:
    """The public key (base64) of one private key (base64)."""
    key = PrivateKey(_key_bytes(private_key.strip(), "the private key"))
    return base64.b64encode(bytes(key.public_key)).decode()


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
