"""The migrations and the ORM models describe the same schema; the snapshot is immutable."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from service.models import Base

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


async def test_models_match_migrations(engine: AsyncEngine) -> None:
    def diff(connection: object) -> list[object]:
        context = MigrationContext.configure(connection)  # type: ignore[arg-type]
        return list(compare_metadata(context, Base.metadata))

    async with engine.connect() as connection:
        differences = await connection.run_sync(diff)
    assert differences == []


async def test_position_components_refuse_update_and_delete(engine: AsyncEngine) -> None:
    user_id, position_id = uuid.uuid4(), uuid.uuid4()
    async with engine.begin() as connection:
        await connection.execute(
            text("INSERT INTO users (id, email) VALUES (:id, :email)"),
            {"id": user_id, "email": f"{user_id}@example.com"},
        )
        await connection.execute(
            text(
                "INSERT INTO synthetic_positions (id, user_id, index_code, size, direction, status)"
                " VALUES (:id, :user, 'BLUECHIP', 100, 'long', 'ACTIVE')"
            ),
            {"id": position_id, "user": user_id},
        )
        await connection.execute(
            text(
                "INSERT INTO position_components (id, position_id, symbol, side, expected_quantity)"
                " VALUES (:id, :position, 'BTCUSDT', 'Buy', :qty)"
            ),
            {"id": uuid.uuid4(), "position": position_id, "qty": Decimal("0.001")},
        )
    for statement in (
        "UPDATE position_components SET expected_quantity = 1 WHERE position_id = :position",
        "DELETE FROM position_components WHERE position_id = :position",
    ):
        with pytest.raises(DBAPIError, match="immutable"):
            async with engine.begin() as connection:
                await connection.execute(text(statement), {"position": position_id})
