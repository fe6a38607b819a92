from __future__ import annotations

import uuid

from sqlalchemy import ForeignKey, String, Text, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from service.models.base import Base, TimestampMixin


class ExchangeCredential(TimestampMixin, Base):
    """A user's Bybit API key and secret, each sealed for the public key the API holds
    (`nacl1:<key id>:<base64>`, service/security.py: only a worker's private key opens it).
    Rows written before the move to sealed boxes, or by an API given only the legacy
    CREDENTIALS_KEYS, are Fernet tokens (no prefix) until `credentials rotate` re-seals them."""

    __tablename__ = "exchange_credentials"

    user_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    api_key_encrypted: Mapped[str] = mapped_column(Text, nullable=False)
    api_secret_encrypted: Mapped[str] = mapped_column(Text, nullable=False)
    # Enough to recognise the key ("abcd…wxyz"), never enough to use it.
    api_key_hint: Mapped[str] = mapped_column(String(32), nullable=False)
