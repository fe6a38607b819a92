from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import Mapped, mapped_column

from service.models.base import Base, TimestampMixin


class PositionStatus(StrEnum):
    PENDING = "PENDING"
    EXECUTING = "EXECUTING"
    ACTIVE = "ACTIVE"
    FAILED = "FAILED"

    @property
    def is_final(self) -> bool:
        return self in (PositionStatus.ACTIVE, PositionStatus.FAILED)


class SyntheticPosition(TimestampMixin, Base):
    __tablename__ = "synthetic_positions"
    __table_args__ = (
        CheckConstraint("size > 0", name="size_positive"),
        CheckConstraint("direction IN ('long', 'short')", name="direction_known"),
        CheckConstraint(
            "status IN ('PENDING', 'EXECUTING', 'ACTIVE', 'FAILED')", name="status_known"
        ),
        Index("ix_synthetic_positions_user_created", "user_id", "created_at"),
        # An Idempotency-Key names one intent per user.
        UniqueConstraint("user_id", "idempotency_key"),
        # The recovery sweeper scans unfinished positions by age.
        Index(
            "ix_synthetic_positions_unfinished",
            "status",
            "updated_at",
            postgresql_where="status IN ('PENDING', 'EXECUTING')",
        ),
        # Reconciliation pages through the positions changed since they were last reconciled.
        Index(
            "ix_synthetic_positions_unreconciled",
            "updated_at",
            "id",
            postgresql_where=(
                "status IN ('EXECUTING', 'ACTIVE', 'FAILED') "
                "AND (reconciled_at IS NULL OR reconciled_at < updated_at)"
            ),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("users.id", ondelete="RESTRICT"), nullable=False
    )
    index_code: Mapped[str] = mapped_column(
        String(32), ForeignKey("indices.code", ondelete="RESTRICT"), nullable=False
    )
    size: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    direction: Mapped[str] = mapped_column(String(8), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="PENDING")
    error: Mapped[str | None] = mapped_column(Text)
    failed_leg: Mapped[int | None] = mapped_column(Integer)
    # The Celery task id that holds the position while it is EXECUTING.
    claim: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Last sign of life of the run holding the claim; the sweeper tells dead runs by it.
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set while a run waits for another basket of the same exchange account (GET shows it).
    account_wait_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When reconciliation last compared this position with the exchange; it is due again
    # once `updated_at` moves past it.
    reconciled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    # SHA-256 of the canonical request body sent with the Idempotency-Key.
    request_fingerprint: Mapped[str | None] = mapped_column(String(64))


class PositionLeg(Base):
    """The plan: computed once before the first order, then only read."""

    __tablename__ = "position_legs"

    position_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("synthetic_positions.id", ondelete="CASCADE"), primary_key=True
    )
    leg: Mapped[int] = mapped_column(Integer, primary_key=True)
    symbol: Mapped[str] = mapped_column(String(32), nullable=False)
    side: Mapped[str] = mapped_column(String(4), nullable=False)
    quantity: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    reference_price: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    order_link_id: Mapped[str] = mapped_column(String(36), unique=True, nullable=False)
    # Set before the order is sent: a leg with it set may exist on the exchange already.
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # How many orders for a partly filled leg's remainder may have been sent (each with its
    # own orderLinkId, looked up by a later run before anything is placed again).
    remainders_submitted: Mapped[int] = mapped_column(
        Integer, nullable=False, default=0, server_default="0"
    )
    # Bybit's positionIdx for the leg's orders, found by pre-flight: 0 in one-way mode, 1
    # (buy side) or 2 (sell side) in hedge mode.
    position_idx: Mapped[int] = mapped_column(
        Integer, nullable=False, default=0, server_default="0"
    )
