"""Initial schema: users, tokens, credentials, indices, positions, plan, trades, snapshot.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None

_tz = sa.DateTime(timezone=True)


def _created() -> sa.Column[object]:
    return sa.Column("created_at", _tz, server_default=sa.func.now(), nullable=False)


def _updated() -> sa.Column[object]:
    return sa.Column("updated_at", _tz, server_default=sa.func.now(), nullable=False)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("email", sa.String(320), nullable=False),
        _created(),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("email", name="uq_users_email"),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        _created(),
        sa.Column("revoked_at", _tz),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], ondelete="CASCADE", name="fk_api_tokens_user_id_users"
        ),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
    )
    op.create_index("ix_api_tokens_user_id", "api_tokens", ["user_id"])
    op.create_table(
        "exchange_credentials",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("api_key_encrypted", sa.Text(), nullable=False),
        sa.Column("api_secret_encrypted", sa.Text(), nullable=False),
        sa.Column("api_key_hint", sa.String(32), nullable=False),
        _created(),
        _updated(),
        sa.PrimaryKeyConstraint("user_id", name="pk_exchange_credentials"),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            ondelete="CASCADE",
            name="fk_exchange_credentials_user_id_users",
        ),
    )
    op.create_table(
        "indices",
        sa.Column("code", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text(), nullable=False, server_default=""),
        _created(),
        _updated(),
        sa.PrimaryKeyConstraint("code", name="pk_indices"),
    )
    op.create_table(
        "index_components",
        sa.Column("index_code", sa.String(32), nullable=False),
        sa.Column("symbol", sa.String(32), nullable=False),
        sa.Column("weight", sa.Numeric(), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("index_code", "symbol", name="pk_index_components"),
        sa.ForeignKeyConstraint(
            ["index_code"],
            ["indices.code"],
            ondelete="CASCADE",
            name="fk_index_components_index_code_indices",
        ),
        sa.CheckConstraint("weight > 0 AND weight <= 1", name="ck_index_components_weight_range"),
    )
    op.create_table(
        "synthetic_positions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("index_code", sa.String(32), nullable=False),
        sa.Column("size", sa.Numeric(), nullable=False),
        sa.Column("direction", sa.String(8), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="PENDING"),
        sa.Column("error", sa.Text()),
        sa.Column("failed_leg", sa.Integer()),
        sa.Column("claim", sa.String(64)),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", _tz),
        sa.Column("heartbeat_at", _tz),
        sa.Column("idempotency_key", sa.String(255)),
        sa.Column("request_fingerprint", sa.String(64)),
        _created(),
        _updated(),
        sa.PrimaryKeyConstraint("id", name="pk_synthetic_positions"),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            ondelete="RESTRICT",
            name="fk_synthetic_positions_user_id_users",
        ),
        sa.ForeignKeyConstraint(
            ["index_code"],
            ["indices.code"],
            ondelete="RESTRICT",
            name="fk_synthetic_positions_index_code_indices",
        ),
        sa.UniqueConstraint("user_id", "idempotency_key", name="uq_synthetic_positions_user_id"),
        sa.CheckConstraint("size > 0", name="ck_synthetic_positions_size_positive"),
        sa.CheckConstraint(
            "direction IN ('long', 'short')", name="ck_synthetic_positions_direction_known"
        ),
        sa.CheckConstraint(
            "status IN ('PENDING', 'EXECUTING', 'ACTIVE', 'FAILED')",
            name="ck_synthetic_positions_status_known",
        ),
    )
    op.create_index(
        "ix_synthetic_positions_user_created", "synthetic_positions", ["user_id", "created_at"]
    )
    op.create_index(
        "ix_synthetic_positions_unfinished",
        "synthetic_positions",
        ["status", "updated_at"],
        postgresql_where=sa.text("status IN ('PENDING', 'EXECUTING')"),
    )
    op.create_table(
        "position_legs",
        sa.Column("position_id", sa.Uuid(), nullable=False),
        sa.Column("leg", sa.Integer(), nullable=False),
        sa.Column("symbol", sa.String(32), nullable=False),
        sa.Column("side", sa.String(4), nullable=False),
        sa.Column("quantity", sa.Numeric(), nullable=False),
        sa.Column("reference_price", sa.Numeric(), nullable=False),
        sa.Column("order_link_id", sa.String(36), nullable=False),
        sa.Column("submitted_at", _tz),
        sa.PrimaryKeyConstraint("position_id", "leg", name="pk_position_legs"),
        sa.ForeignKeyConstraint(
            ["position_id"],
            ["synthetic_positions.id"],
            ondelete="CASCADE",
            name="fk_position_legs_position_id_synthetic_positions",
        ),
        sa.UniqueConstraint("order_link_id", name="uq_position_legs_order_link_id"),
    )
    op.create_table(
        "trades",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("position_id", sa.Uuid(), nullable=False),
        sa.Column("leg", sa.Integer(), nullable=False),
        sa.Column("symbol", sa.String(32), nullable=False),
        sa.Column("side", sa.String(4), nullable=False),
        sa.Column("bybit_order_id", sa.String(64), nullable=False),
        sa.Column("order_link_id", sa.String(36), nullable=False),
        sa.Column("price", sa.Numeric(), nullable=False),
        sa.Column("quantity", sa.Numeric(), nullable=False),
        sa.Column("fee", sa.Numeric()),
        sa.Column("order_status", sa.String(32), nullable=False),
        sa.Column("executed_at", _tz, nullable=False),
        _created(),
        sa.PrimaryKeyConstraint("id", name="pk_trades"),
        sa.ForeignKeyConstraint(
            ["position_id"],
            ["synthetic_positions.id"],
            ondelete="RESTRICT",
            name="fk_trades_position_id_synthetic_positions",
        ),
        sa.UniqueConstraint("order_link_id", name="uq_trades_order_link_id"),
    )
    op.create_index("ix_trades_position_id", "trades", ["position_id"])
    op.create_table(
        "position_components",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("position_id", sa.Uuid(), nullable=False),
        sa.Column("symbol", sa.String(32), nullable=False),
        sa.Column("side", sa.String(4), nullable=False),
        sa.Column("expected_quantity", sa.Numeric(), nullable=False),
        _created(),
        sa.PrimaryKeyConstraint("id", name="pk_position_components"),
        sa.ForeignKeyConstraint(
            ["position_id"],
            ["synthetic_positions.id"],
            ondelete="RESTRICT",
            name="fk_position_components_position_id_synthetic_positions",
        ),
        sa.UniqueConstraint("position_id", "symbol", name="uq_position_components_position_id"),
    )
    # The snapshot is immutable: the database itself refuses to change or remove a row.
    op.execute(
        """
        CREATE FUNCTION position_components_immutable() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'position_components is immutable: % refused', TG_OP
                USING ERRCODE = 'restrict_violation';
        END
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER position_components_immutable
        BEFORE UPDATE OR DELETE ON position_components
        FOR EACH ROW EXECUTE FUNCTION position_components_immutable()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS position_components_immutable ON position_components")
    op.execute("DROP FUNCTION IF EXISTS position_components_immutable()")
    for table in (
        "position_components",
        "trades",
        "position_legs",
        "synthetic_positions",
        "index_components",
        "indices",
        "exchange_credentials",
        "api_tokens",
        "users",
    ):
        op.drop_table(table)
