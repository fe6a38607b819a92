"""An index of each user's positions not yet final, for the open-positions budget.

The budget's count (service/budgets.py) runs in every POST /api/positions, under the user's
admission lock: with only (user_id, created_at) it read every position the user ever had.
The partial index holds only positions not yet final, which the budget keeps to a few per
user. A plain CREATE INDEX (the migration runs in one transaction): it blocks writes to
synthetic_positions while it is built, a moment on a table of this size; on a very large one,
build it by hand beforehand with CREATE INDEX CONCURRENTLY under the same name.

Revision ID: 0008_user_open_positions
Revises: 0007_token_expiry_cancel
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0008_user_open_positions"
down_revision = "0007_token_expiry_cancel"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "CREATE INDEX IF NOT EXISTS ix_synthetic_positions_user_open ON synthetic_positions "
        "(user_id) WHERE status IN ('PENDING', 'EXECUTING', 'CLOSING')"
    )


def downgrade() -> None:
    op.drop_index("ix_synthetic_positions_user_open", table_name="synthetic_positions")
