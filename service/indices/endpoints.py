from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from service.dependencies import Indices, Session
from service.positions.schemas import DecimalString

router = APIRouter(prefix="/api/indices", tags=["indices"])


class ComponentOut(BaseModel):
    symbol: str
    weight: DecimalString


class IndexOut(BaseModel):
    code: str
    name: str
    description: str
    components: list[ComponentOut]


@router.get("", response_model=list[IndexOut])
async def list_indices(session: Session, indices: Indices) -> list[IndexOut]:
    return [
        IndexOut(
            code=i.code,
            name=i.name,
            description=i.description,
            components=[ComponentOut(symbol=c.symbol, weight=c.weight) for c in i.components],
        )
        for i in await indices.all(session)
    ]
