from __future__ import annotations

from decimal import Decimal

from sqlalchemy import CheckConstraint, ForeignKey, Integer, Numeric, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from service.models.base import Base, TimestampMixin


class Index(TimestampMixin, Base):
    """A synthetic index: a weighted basket of Bybit linear USDT perpetuals."""

    __tablename__ = "indices"

    code: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    description: Mapped[str] = mapped_column(Text, nullable=False, default="")
    components: Mapped[list[IndexComponent]] = relationship(
        back_populates="index",
        lazy="raise",
        order_by="IndexComponent.ordinal",
        cascade="all, delete-orphan",
    )


class IndexComponent(Base):
    __tablename__ = "index_components"
    __table_args__ = (CheckConstraint("weight > 0 AND weight <= 1", name="weight_range"),)

    index_code: Mapped[str] = mapped_column(
        String(32), ForeignKey("indices.code", ondelete="CASCADE"), primary_key=True
    )
    symbol: Mapped[str] = mapped_column(String(32), primary_key=True)
    weight: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    # Components trade in this order (leg 0 first).
    ordinal: Mapped[int] = mapped_column(Integer, nullable=False)
    index: Mapped[Index] = relationship(back_populates="components", lazy="raise")
