from __future__ import annotations

import uuid

from sqlalchemy import ForeignKey, String, Text, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from service.models.base import Base, TimestampMixin


class ExchangeCredential(TimestampMixin, Base):
    """A user's Bybit API key and secret, each encrypted with the first CREDENTIALS_KEYS key."""

    __tablename__ = "exchange_credentials"

    user_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    api_key_encrypted: Mapped[str] = mapped_column(Text, nullable=False)
    api_secret_encrypted: Mapped[str] = mapped_column(Text, nullable=False)
    # Enough to recognise the key ("abcd…wxyz"), never enough to use it.
    api_key_hint: Mapped[str] = mapped_column(String(32), nullable=False)
