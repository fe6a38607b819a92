from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, ForeignKey, String, UniqueConstraint, Uuid, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from service.models.base import Base


class ReconciliationIssue(Base):
    """A difference between our books and the exchange's records for one leg, found once."""

    __tablename__ = "reconciliation_issues"
    __table_args__ = (UniqueConstraint("order_link_id", "kind"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    position_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("synthetic_positions.id", ondelete="RESTRICT"), nullable=False, index=True
    )
    order_link_id: Mapped[str] = mapped_column(String(36), nullable=False)
    # missing_fill | quantity_mismatch | price_mismatch | unknown_order
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    exchange: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    recorded: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), nullable=False
    )
