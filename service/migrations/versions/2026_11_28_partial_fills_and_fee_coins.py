"""Partial fills completed by remainder orders, and fees in whatever coin Bybit charged them.

- `position_legs.remainders_submitted`: how many remainder orders of a partly filled leg may
  have been sent (each is looked up by its own orderLinkId before anything is re-sent).
- `position_legs.position_idx`: Bybit's positionIdx for the leg's orders (0 one-way; 1 or 2
  in hedge mode), found by pre-flight.
- `trades.fee_coin`, `trades.fee_detail`: the fee's coin and every coin's fee (cumFeeDetail).

Revision ID: 0004_partial_fills_fee_coins
Revises: 0003_account_wait_reconciled_at
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004_partial_fills_fee_coins"
down_revision = "0003_account_wait_reconciled_at"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "position_legs",
        sa.Column("remainders_submitted", sa.Integer(), server_default="0", nullable=False),
    )
    op.add_column(
        "position_legs",
        sa.Column("position_idx", sa.Integer(), server_default="0", nullable=False),
    )
    op.add_column("trades", sa.Column("fee_coin", sa.String(16)))
    op.add_column("trades", sa.Column("fee_detail", postgresql.JSONB()))
    # Fees recorded before were read from cumExecFee: USDT for linear orders.
    op.execute("UPDATE trades SET fee_coin = 'USDT' WHERE fee IS NOT NULL")


def downgrade() -> None:
    op.drop_column("trades", "fee_detail")
    op.drop_column("trades", "fee_coin")
    op.drop_column("position_legs", "position_idx")
    op.drop_column("position_legs", "remainders_submitted")
