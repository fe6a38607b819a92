"""Tokens expire, and a PENDING position can be cancelled.

- `api_tokens.expires_at` (NOT NULL): set at issue time to TOKEN_TTL_SECONDS later. Tokens
  issued before this migration get now() + TOKEN_TTL_SECONDS (the setting as the migration
  job sees it), not created_at + TTL: they were issued without a stated lifetime, and
  expiring the older ones the moment the migration commits would lock their users out with
  no warning. Each gets one full TTL from the upgrade instead; an operator who wants them
  gone sooner lists and revokes them (`python -m service users tokens EMAIL`,
  `users revoke-token ID`).
- The CANCELLED status in the status check. No index changes: the recovery sweep's index
  lists the statuses it scans (CANCELLED is not one), and reconciliation only reads the
  statuses it names.

Both are catalogue changes plus one UPDATE of `api_tokens` (a small table). Deploy the
workers and the API after the migration: an older API would issue tokens without
`expires_at` (refused by NOT NULL), and an older worker reads CANCELLED as an unknown status
(it discards the task either way, since CANCELLED is neither PENDING nor its claim).

Revision ID: 0007_token_expiry_cancel
Revises: 0006_execution_mode
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_token_expiry_cancel"
down_revision = "0006_execution_mode"
branch_labels = None
depends_on = None

_STATUSES = "'PENDING', 'EXECUTING', 'ACTIVE', 'FAILED', 'CLOSING', 'CLOSED', 'CLOSE_FAILED'"
_STATUS_CHECK = "ck_synthetic_positions_ck_synthetic_positions_status_known"


def _status_check(statuses: str) -> None:
    op.execute(f"ALTER TABLE synthetic_positions DROP CONSTRAINT {_STATUS_CHECK}")
    op.execute(
        f"ALTER TABLE synthetic_positions ADD CONSTRAINT {_STATUS_CHECK} "
        f"CHECK (status IN ({statuses}))"
    )


def _token_ttl_seconds() -> float:
    from service.config import Settings

    try:
        from service.config import get_settings

        return float(get_settings().token_ttl_seconds)
    except ValueError:  # settings this job cannot validate: the default TTL
        default = Settings.model_fields["token_ttl_seconds"].default
        return float(default)


def upgrade() -> None:
    _status_check(f"{_STATUSES}, 'CANCELLED'")
    op.add_column("api_tokens", sa.Column("expires_at", sa.DateTime(timezone=True)))
    op.execute(
        sa.text(
            "UPDATE api_tokens SET expires_at = now() + make_interval(secs => :ttl)"
        ).bindparams(ttl=_token_ttl_seconds())
    )
    op.alter_column("api_tokens", "expires_at", nullable=False)


def downgrade() -> None:
    # A cancelled position has no state before this revision: refuse rather than invent one.
    op.execute(
        "DO $$ BEGIN IF EXISTS (SELECT 1 FROM synthetic_positions WHERE status = 'CANCELLED') "
        "THEN RAISE EXCEPTION 'positions were cancelled: downgrading would leave them without "
        "a known status'; END IF; END $$"
    )
    op.drop_column("api_tokens", "expires_at")
    _status_check(_STATUSES)
