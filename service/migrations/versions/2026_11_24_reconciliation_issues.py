"""Reconciliation issues: differences between recorded fills and the exchange's records.

Revision ID: 0002_reconciliation
Revises: 0001_initial
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002_reconciliation"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reconciliation_issues",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("position_id", sa.Uuid(), nullable=False),
        sa.Column("order_link_id", sa.String(36), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("exchange", postgresql.JSONB()),
        sa.Column("recorded", postgresql.JSONB()),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name="pk_reconciliation_issues"),
        sa.ForeignKeyConstraint(
            ["position_id"],
            ["synthetic_positions.id"],
            ondelete="RESTRICT",
            name="fk_reconciliation_issues_position_id_synthetic_positions",
        ),
        sa.UniqueConstraint("order_link_id", "kind", name="uq_reconciliation_issues_order_link_id"),
    )
    op.create_index(
        "ix_reconciliation_issues_position_id", "reconciliation_issues", ["position_id"]
    )


def downgrade() -> None:
    op.drop_table("reconciliation_issues")
