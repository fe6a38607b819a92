from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

from sqlalchemy import CheckConstraint, DateTime, ForeignKey, Integer, Numeric, String, Uuid, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from service.models.base import Base


class Trade(Base):
    """One filled order of a leg (the first, or one for a partial fill's remainder), recorded
    as soon as the exchange reports the fill."""

    __tablename__ = "trades"
    __table_args__ = (CheckConstraint("phase IN ('open', 'close')", name="phase_known"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    position_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("synthetic_positions.id", ondelete="RESTRICT"), nullable=False, index=True
    )
    leg: Mapped[int] = mapped_column(Integer, nullable=False)
    symbol: Mapped[str] = mapped_column(String(32), nullable=False)
    side: Mapped[str] = mapped_column(String(4), nullable=False)
    bybit_order_id: Mapped[str] = mapped_column(String(64), nullable=False)
    # Unique: an order is recorded once, however many runs report it.
    order_link_id: Mapped[str] = mapped_column(String(36), unique=True, nullable=False)
    price: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    quantity: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    # The fee in `fee_coin` (Bybit may charge it in another coin than USDT), and every coin's
    # fee as Bybit reported them (cumFeeDetail).
    fee: Mapped[Decimal | None] = mapped_column(Numeric)
    fee_coin: Mapped[str | None] = mapped_column(String(16))
    fee_detail: Mapped[dict[str, str] | None] = mapped_column(JSONB)
    order_status: Mapped[str] = mapped_column(String(32), nullable=False)
    # 'open': an order of the opening (side = the leg's side); 'close': a reduce-only order
    # of a close (side = the opposite).
    phase: Mapped[str] = mapped_column(
        String(8), nullable=False, default="open", server_default="open"
    )
    executed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), nullable=False
    )
