"""The API benchmark's baseline: the service's own app (same middleware, same pools, served by
the same `python -m service api` command) plus one endpoint that does only what any accepting
endpoint must: one INSERT of a PENDING row and one push onto a Redis list."""

from __future__ import annotations

import json
import os
import uuid
from decimal import Decimal

from fastapi import FastAPI, Request, status
from pydantic import BaseModel
from sqlalchemy import insert

from service.api import create_app as create_service_app
from service.models import PositionStatus, SyntheticPosition

BARE_QUEUE_SUFFIX = "-bare"


class BareIn(BaseModel):
    index: str
    size: Decimal
    direction: str


class BareOut(BaseModel):
    id: uuid.UUID
    status: str


def create_app() -> FastAPI:
    app = create_service_app()
    user_id = uuid.UUID(os.environ["BENCH_USER_ID"])
    queue = os.environ["CELERY_QUEUE"] + BARE_QUEUE_SUFFIX

    @app.post("/bench/bare", status_code=status.HTTP_202_ACCEPTED)
    async def bare(body: BareIn, request: Request) -> BareOut:
        position_id = uuid.uuid4()
        async with request.app.state.session_factory() as session:
            await session.execute(
                insert(SyntheticPosition).values(
                    id=position_id,
                    user_id=user_id,
                    index_code=body.index,
                    size=body.size,
                    direction=body.direction,
                    status=PositionStatus.PENDING,
                    attempts=0,
                )
            )
            await session.commit()
        await request.app.state.redis.lpush(queue, json.dumps({"id": str(position_id)}))
        return BareOut(id=position_id, status=PositionStatus.PENDING)

    return app
