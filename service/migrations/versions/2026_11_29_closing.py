"""Closing a position: the CLOSING, CLOSED and CLOSE_FAILED states, each close round's plan,
the Idempotency-Keys of close requests, and the phase of every fill.

- `synthetic_positions.close_round`: how many closes were asked for (their orderLinkIds carry
  it); `close_error`: why the last one ended CLOSE_FAILED; `close_requested_at`: when the last
  was asked for; `exchange_uid`: the Bybit account the opening traded.
- `position_close_legs`: per round, the reduce-only order of each leg that held something
  (and what the exchange no longer held of it).
- `position_close_requests`: the Idempotency-Key of a close request and the round it began.
- `position_legs.refused_at`: the exchange refused the leg's first order outright (it placed
  nothing), so a FAILED basket whose submitted legs were all refused holds nothing.
- `trades.phase`: 'open' or 'close' (every fill recorded before is an opening one).
- The recovery sweep's index covers CLOSING, reconciliation's every status but PENDING (a
  close's orders are reconciled too).

The CHECK constraints are checked against every row inside the migration's one transaction
(all or nothing): on a large `trades` table, run it at a quiet moment. Deploy the workers
before the API: the API
sends close_position_task, which older workers do not know.

Revision ID: 0005_closing
Revises: 0004_partial_fills_fee_coins
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_closing"
down_revision = "0004_partial_fills_fee_coins"
branch_labels = None
depends_on = None

_STATUSES = "'PENDING', 'EXECUTING', 'ACTIVE', 'FAILED', 'CLOSING', 'CLOSED', 'CLOSE_FAILED'"
_OPENING_STATUSES = "'PENDING', 'EXECUTING', 'ACTIVE', 'FAILED'"
# The name the first migration gave it (the naming convention prefixed its explicit name).
_STATUS_CHECK = "ck_synthetic_positions_ck_synthetic_positions_status_known"


def _status_check(statuses: str) -> None:
    op.execute(f"ALTER TABLE synthetic_positions DROP CONSTRAINT {_STATUS_CHECK}")
    op.execute(
        f"ALTER TABLE synthetic_positions ADD CONSTRAINT {_STATUS_CHECK} "
        f"CHECK (status IN ({statuses}))"
    )


def _reconciliation_index(statuses: str) -> None:
    op.drop_index("ix_synthetic_positions_unreconciled", table_name="synthetic_positions")
    op.create_index(
        "ix_synthetic_positions_unreconciled",
        "synthetic_positions",
        ["updated_at", "id"],
        postgresql_where=sa.text(
            f"{statuses} AND (reconciled_at IS NULL OR reconciled_at < updated_at)"
        ),
    )


def upgrade() -> None:
    _status_check(_STATUSES)
    op.add_column(
        "synthetic_positions",
        sa.Column("close_round", sa.Integer(), server_default="0", nullable=False),
    )
    op.add_column("synthetic_positions", sa.Column("close_error", sa.Text()))
    op.add_column(
        "synthetic_positions", sa.Column("close_requested_at", sa.DateTime(timezone=True))
    )
    op.add_column("synthetic_positions", sa.Column("exchange_uid", sa.String(32)))
    op.add_column("position_legs", sa.Column("refused_at", sa.DateTime(timezone=True)))
    op.drop_index("ix_synthetic_positions_unfinished", table_name="synthetic_positions")
    op.create_index(
        "ix_synthetic_positions_unfinished",
        "synthetic_positions",
        ["status", "updated_at"],
        postgresql_where=sa.text("status IN ('PENDING', 'EXECUTING', 'CLOSING')"),
    )
    _reconciliation_index("status <> 'PENDING'")
    op.add_column("trades", sa.Column("phase", sa.String(8), server_default="open", nullable=False))
    op.execute(
        "ALTER TABLE trades ADD CONSTRAINT ck_trades_phase_known CHECK (phase IN ('open', 'close'))"
    )

    op.create_table(
        "position_close_legs",
        sa.Column("position_id", sa.Uuid(), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("leg", sa.Integer(), nullable=False),
        sa.Column("symbol", sa.String(32), nullable=False),
        sa.Column("side", sa.String(4), nullable=False),
        sa.Column("quantity", sa.Numeric(), nullable=False),
        sa.Column("position_idx", sa.Integer(), nullable=False),
        sa.Column("order_link_id", sa.String(36), nullable=False),
        sa.Column("submitted_at", sa.DateTime(timezone=True)),
        sa.Column("refused_at", sa.DateTime(timezone=True)),
        sa.Column("remainders_submitted", sa.Integer(), server_default="0", nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("closed_elsewhere", sa.Numeric(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(
            ["position_id"],
            ["synthetic_positions.id"],
            name="fk_position_close_legs_position_id_synthetic_positions",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("position_id", "round", "leg", name="pk_position_close_legs"),
        sa.UniqueConstraint("order_link_id", name="uq_position_close_legs_order_link_id"),
    )
    op.create_table(
        "position_close_requests",
        sa.Column("position_id", sa.Uuid(), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["position_id"],
            ["synthetic_positions.id"],
            name="fk_position_close_requests_position_id_synthetic_positions",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "position_id", "idempotency_key", name="pk_position_close_requests"
        ),
    )


def downgrade() -> None:
    # Without `phase`, closing fills would read as opening ones (twice what is held): refuse
    # while any close happened.
    op.execute(
        "DO $$ BEGIN IF EXISTS (SELECT 1 FROM synthetic_positions WHERE close_round > 0) THEN "
        "RAISE EXCEPTION 'positions were closed: downgrading would misread their fills'; "
        "END IF; END $$"
    )
    op.drop_table("position_close_requests")
    op.drop_table("position_close_legs")
    op.execute("ALTER TABLE trades DROP CONSTRAINT ck_trades_phase_known")
    op.drop_column("trades", "phase")
    op.drop_index("ix_synthetic_positions_unfinished", table_name="synthetic_positions")
    op.create_index(
        "ix_synthetic_positions_unfinished",
        "synthetic_positions",
        ["status", "updated_at"],
        postgresql_where=sa.text("status IN ('PENDING', 'EXECUTING')"),
    )
    _reconciliation_index("status IN ('EXECUTING', 'ACTIVE', 'FAILED')")
    op.drop_column("position_legs", "refused_at")
    op.drop_column("synthetic_positions", "exchange_uid")
    op.drop_column("synthetic_positions", "close_requested_at")
    op.drop_column("synthetic_positions", "close_error")
    op.drop_column("synthetic_positions", "close_round")
    _status_check(_OPENING_STATUSES)
