"""Opening and reading positions. The worker's status changes go through
service/execution.py; this module only ever writes a new PENDING row."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy.ext.asyncio import AsyncSession

from service.credentials.service import has_credentials
from service.errors import ConflictError, NotFoundError, ValidationError
from service.indices import repository as indices_repository
from service.models import PositionComponent, SyntheticPosition, Trade, User
from service.positions import repository
from service.trading_logic import Direction


@dataclass(frozen=True, slots=True)
class PositionDetail:
    position: SyntheticPosition
    components: list[PositionComponent]
    trades: list[Trade]


async def open_position(
    session: AsyncSession, user: User, *, index_code: str, size: Decimal, direction: Direction
) -> SyntheticPosition:
    index = await indices_repository.get_index(session, index_code)
    if index is None:
        known = ", ".join(i.code for i in await indices_repository.list_indices(session))
        raise ValidationError(f"unknown index {index_code!r}; known indices: {known}")
    if not await has_credentials(session, user.id):
        raise ConflictError("no Bybit credentials stored: PUT /api/credentials first")
    return await repository.add_position(
        session, user_id=user.id, index_code=index.code, size=size, direction=direction.value
    )


async def position_detail(
    session: AsyncSession, user: User, position_id: uuid.UUID
) -> PositionDetail:
    position = await repository.get_user_position(session, user.id, position_id)
    if position is None:
        # Another user's position is as absent as a missing one.
        raise NotFoundError(f"position {position_id} not found")
    return PositionDetail(
        position=position,
        components=list(await repository.get_components(session, position_id)),
        trades=list(await repository.get_trades(session, position_id)),
    )


async def list_positions(session: AsyncSession, user: User, *, limit: int) -> list[PositionDetail]:
    positions = await repository.list_user_positions(session, user.id, limit=limit)
    return [
        PositionDetail(
            position=p,
            components=list(await repository.get_components(session, p.id)),
            trades=list(await repository.get_trades(session, p.id)),
        )
        for p in positions
    ]
