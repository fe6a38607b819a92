"""How a position's legs are sent: `execution` is `sequential` (one order after another,
stopping at the first leg that fails for good; the default, and every existing position's) or
`batch` (every first order in create-batch requests, then every fill read at once).

Adding a NOT NULL column with a constant default is a catalogue change in PostgreSQL 11+: no
rewrite of the table, no long lock.

Revision ID: 0006_execution_mode
Revises: 0005_closing
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_execution_mode"
down_revision = "0005_closing"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "synthetic_positions",
        sa.Column("execution", sa.String(16), nullable=False, server_default="sequential"),
    )
    op.create_check_constraint(
        op.f("ck_synthetic_positions_execution_known"),
        "synthetic_positions",
        "execution IN ('sequential', 'batch')",
    )


def downgrade() -> None:
    op.drop_constraint(
        op.f("ck_synthetic_positions_execution_known"), "synthetic_positions", type_="check"
    )
    op.drop_column("synthetic_positions", "execution")
