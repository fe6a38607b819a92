"""Waiting for the exchange account, and reconciliation's own bookmark per position.

- `account_wait_since`: set while a run waits for another basket of the same exchange account
  (runs of one account are serialised), shown by GET as `waiting_for_account`.
- `reconciled_at`: when reconciliation last compared the position with the exchange; the
  position is due again once `updated_at` moves past it. Existing positions start unreconciled
  and are covered by the next reconciliation runs (within RECONCILE_WINDOW_SECONDS).

Revision ID: 0003_account_wait_reconciled_at
Revises: 0002_reconciliation
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_account_wait_reconciled_at"
down_revision = "0002_reconciliation"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "synthetic_positions", sa.Column("account_wait_since", sa.DateTime(timezone=True))
    )
    op.add_column("synthetic_positions", sa.Column("reconciled_at", sa.DateTime(timezone=True)))
    # Built without blocking writes: on a large table a plain CREATE INDEX would hold up
    # every status change (and the runs' ownership checks) for as long as it takes.
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_synthetic_positions_unreconciled",
            "synthetic_positions",
            ["updated_at", "id"],
            postgresql_where=sa.text(
                "status IN ('EXECUTING', 'ACTIVE', 'FAILED') "
                "AND (reconciled_at IS NULL OR reconciled_at < updated_at)"
            ),
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_synthetic_positions_unreconciled",
            table_name="synthetic_positions",
            postgresql_concurrently=True,
            if_exists=True,
        )
    op.drop_column("synthetic_positions", "reconciled_at")
    op.drop_column("synthetic_positions", "account_wait_since")
