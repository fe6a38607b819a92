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
    func,
)
from sqlalchemy.orm import Mapped, mapped_column

from service.models.base import Base, TimestampMixin


class PositionStatus(StrEnum):
    PENDING = "PENDING"
    EXECUTING = "EXECUTING"
    ACTIVE = "ACTIVE"
    FAILED = "FAILED"
    # Closing: ACTIVE, or FAILED holding legs, -> CLOSING -> CLOSED | CLOSE_FAILED, and
    # CLOSE_FAILED -> CLOSING again.
    CLOSING = "CLOSING"
    CLOSED = "CLOSED"
    CLOSE_FAILED = "CLOSE_FAILED"
    # A PENDING position its owner cancelled before any worker claimed it (nothing was sent):
    # final, like CLOSED.
    CANCELLED = "CANCELLED"

    @property
    def is_final(self) -> bool:
        """No run is due: the opening or a close has ended, or the opening was cancelled
        (CLOSED and CANCELLED are the only ends of all)."""
        return self in _AT_REST

    @property
    def is_run(self) -> bool:
        """A run holds (or is about to hold) the position: opening or closing."""
        return self in (PositionStatus.EXECUTING, PositionStatus.CLOSING)


_AT_REST = frozenset(
    {
        PositionStatus.ACTIVE,
        PositionStatus.FAILED,
        PositionStatus.CLOSED,
        PositionStatus.CLOSE_FAILED,
        PositionStatus.CANCELLED,
    }
)
STATUS_VALUES = ", ".join(f"'{status.value}'" for status in PositionStatus)


class ExecutionMode(StrEnum):
    """How an opening's legs are sent."""

    # One order after another, each fill read before the next order: stops at the first leg
    # that fails for good, so a refusal leaves the fewest legs held.
    SEQUENTIAL = "sequential"
    # Every leg's first order in create-batch requests, then every fill read at once: the
    # shortest time holding part of the basket, but a leg refused inside the batch leaves the
    # other legs of the batch held (nothing is reversed).
    BATCH = "batch"


EXECUTION_VALUES = ", ".join(f"'{mode.value}'" for mode in ExecutionMode)


class SyntheticPosition(TimestampMixin, Base):
    __tablename__ = "synthetic_positions"
    __table_args__ = (
        CheckConstraint("size > 0", name="size_positive"),
        CheckConstraint("direction IN ('long', 'short')", name="direction_known"),
        CheckConstraint(f"status IN ({STATUS_VALUES})", name="status_known"),
        CheckConstraint(f"execution IN ({EXECUTION_VALUES})", name="execution_known"),
        Index("ix_synthetic_positions_user_created", "user_id", "created_at"),
        # An Idempotency-Key names one intent per user.
        UniqueConstraint("user_id", "idempotency_key"),
        # The recovery sweeper scans unfinished positions by age.
        Index(
            "ix_synthetic_positions_unfinished",
            "status",
            "updated_at",
            postgresql_where="status IN ('PENDING', 'EXECUTING', 'CLOSING')",
        ),
        # The open-positions budget counts a user's positions not yet final (service/budgets.py):
        # at most the budget's worth of entries, whatever the user's history.
        Index(
            "ix_synthetic_positions_user_open",
            "user_id",
            postgresql_where="status IN ('PENDING', 'EXECUTING', 'CLOSING')",
        ),
        # Reconciliation pages through the positions changed since they were last reconciled.
        Index(
            "ix_synthetic_positions_unreconciled",
            "updated_at",
            "id",
            postgresql_where=(
                "status <> 'PENDING' AND (reconciled_at IS NULL OR reconciled_at < updated_at)"
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
    # How the legs are sent (ExecutionMode): one after another, or in create-batch requests.
    execution: Mapped[str] = mapped_column(
        String(16),
        nullable=False,
        default=ExecutionMode.SEQUENTIAL,
        server_default=ExecutionMode.SEQUENTIAL.value,
    )
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
    # How many times a close was asked for (0: never): a close's orders carry its round in
    # their orderLinkIds, so a close tried again after CLOSE_FAILED never reuses one.
    close_round: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    # Why the last close ended CLOSE_FAILED (the opening's own failure stays in `error`).
    close_error: Mapped[str | None] = mapped_column(Text)
    # When the last close was asked for: what its waits and budgets are measured from.
    close_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The exchange account (Bybit's UID, from /v5/user/query-api) the opening traded, read by
    # pre-flight: a close sent with a key of another account is refused, nothing sent.
    exchange_uid: Mapped[str | None] = mapped_column(String(32))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    # SHA-256 of the canonical request body sent with the Idempotency-Key.
    request_fingerprint: Mapped[str | None] = mapped_column(String(64))


class SentOrderColumns:
    """The exactly-once protocol's record of a leg's orders (the opening's, or a close
    round's): its first order's orderLinkId, and what may have been sent. A later run looks up
    every order that may have been sent before it places anything."""

    order_link_id: Mapped[str] = mapped_column(String(36), unique=True, nullable=False)
    # Set before the order is sent: a leg with it set may exist on the exchange already.
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set when the exchange refused the leg's first order outright (it placed nothing): a
    # basket whose every submitted leg was refused holds nothing.
    refused_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # How many orders for a partly filled leg's remainder may have been sent (each with its
    # own orderLinkId, looked up by a later run before anything is placed again).
    remainders_submitted: Mapped[int] = mapped_column(
        Integer, nullable=False, default=0, server_default="0"
    )


class PositionLeg(SentOrderColumns, Base):
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
    # Bybit's positionIdx for the leg's orders, found by pre-flight: 0 in one-way mode, 1
    # (buy side) or 2 (sell side) in hedge mode.
    position_idx: Mapped[int] = mapped_column(
        Integer, nullable=False, default=0, server_default="0"
    )

    reduce_only = False

    @property
    def opening_side(self) -> str:
        return self.side

    def remainder_link(self, remainder: int) -> str:
        return remainder_link_id(self.position_id, self.leg, remainder)


class PositionCloseLeg(SentOrderColumns, Base):
    """The plan of one close round: per leg that held something when the round began, a
    reduce-only order for exactly that quantity. Written once before the round's first
    order; a later run of the round reads it back."""

    __tablename__ = "position_close_legs"

    position_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("synthetic_positions.id", ondelete="CASCADE"), primary_key=True
    )
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    leg: Mapped[int] = mapped_column(Integer, primary_key=True)
    symbol: Mapped[str] = mapped_column(String(32), nullable=False)
    # The closing order's side: the opposite of the leg's opening side.
    side: Mapped[str] = mapped_column(String(4), nullable=False)
    quantity: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    # The positionIdx of the position being reduced (the opening leg's).
    position_idx: Mapped[int] = mapped_column(Integer, nullable=False)
    # Why this leg could not be closed in this round (it is not tried again in the round).
    error: Mapped[str | None] = mapped_column(Text)
    # What the exchange no longer held of this leg when the round tried it (reduced outside
    # the service: by hand, a liquidation, ADL): not sold by this round, not held either.
    closed_elsewhere: Mapped[Decimal] = mapped_column(
        Numeric, nullable=False, default=0, server_default="0"
    )

    reduce_only = True

    @property
    def opening_side(self) -> str:
        return "Buy" if self.side == "Sell" else "Sell"

    def remainder_link(self, remainder: int) -> str:
        return close_remainder_link_id(self.position_id, self.round, self.leg, remainder)


class PositionCloseRequest(Base):
    """An Idempotency-Key sent with POST /api/positions/{id}/close, and the round it began
    (a repeat answers with the position as it is, and starts nothing)."""

    __tablename__ = "position_close_requests"

    position_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("synthetic_positions.id", ondelete="CASCADE"), primary_key=True
    )
    idempotency_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), nullable=False
    )


def open_link_id(position_id: uuid.UUID, leg: int) -> str:
    """A leg's first opening order: 32 hex + '-' + leg, at most 36 characters."""
    return f"{position_id.hex}-{leg}"


def remainder_link_id(position_id: uuid.UUID, leg: int, remainder: int) -> str:
    """An opening order for a partial fill's remainder: 28 hex of the position (112 bits) +
    '-' + leg + '-r' + the remainder's number."""
    return f"{position_id.hex[:28]}-{leg}-r{remainder}"


def close_link_id(position_id: uuid.UUID, round_: int, leg: int) -> str:
    """A leg's first closing order in close round `round_`: 24 hex + '-c' + round + '-' +
    leg. The 'c' keeps it apart from every opening id; at most 36 characters for rounds and
    legs below 1000."""
    return f"{position_id.hex[:24]}-c{round_}-{leg}"


def close_remainder_link_id(position_id: uuid.UUID, round_: int, leg: int, remainder: int) -> str:
    return f"{position_id.hex[:20]}-c{round_}-{leg}-r{remainder}"


# A leg as the per-leg exchange protocol sees it: an opening leg or a close round's leg.
PlannedLeg = PositionLeg | PositionCloseLeg
