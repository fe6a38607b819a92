"""The API benchmark's baseline: a separate, minimal FastAPI app with none of the service's
middleware, ORM, settings or pools. `POST /positions` does what any accepting endpoint must
(one asyncpg INSERT of a PENDING row, one redis.asyncio LPUSH); `GET /positions/{id}` does
one primary-key SELECT. It is served by the same command and uvicorn settings as the service
(`python -m service api --app tests.benchmarks.minimal_app:create_app`), so the two differ
only in what the endpoints do.

Environment: DATABASE_URL, REDIS_URL, CELERY_QUEUE (the list it pushes onto gets a suffix, so
no worker takes these messages) and BENCH_USER_ID (the owner of the rows it inserts).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal

import asyncpg
import redis.asyncio as aioredis
from fastapi import FastAPI, HTTPException, Request, status
from pydantic import BaseModel

MINIMAL_QUEUE_SUFFIX = "-minimal"

_INSERT = (
    "INSERT INTO synthetic_positions (id, user_id, index_code, size, direction, status, attempts)"
    " VALUES ($1, $2, $3, $4, $5, 'PENDING', 0)"
)
_SELECT = (
    "SELECT id, index_code, size, direction, status, attempts, created_at, updated_at"
    " FROM synthetic_positions WHERE id = $1"
)


class PositionIn(BaseModel):
    index: str
    size: Decimal
    direction: str


class PositionOut(BaseModel):
    id: uuid.UUID
    status: str


def create_app() -> FastAPI:
    database_url = os.environ["DATABASE_URL"].replace("postgresql+asyncpg://", "postgresql://")
    user_id = uuid.UUID(os.environ["BENCH_USER_ID"])
    queue = os.environ["CELERY_QUEUE"] + MINIMAL_QUEUE_SUFFIX

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The service's pool size (service/api.py: 10, and as many again on overflow).
        app.state.pool = await asyncpg.create_pool(database_url, min_size=10, max_size=20)
        app.state.redis = aioredis.from_url(os.environ["REDIS_URL"])
        try:
            yield
        finally:
            await app.state.redis.aclose()
            await app.state.pool.close()

    app = FastAPI(lifespan=lifespan)

    @app.post("/positions", status_code=status.HTTP_202_ACCEPTED)
    async def accept(body: PositionIn, request: Request) -> PositionOut:
        position_id = uuid.uuid4()
        await request.app.state.pool.execute(
            _INSERT, position_id, user_id, body.index, body.size, body.direction
        )
        await request.app.state.redis.lpush(queue, json.dumps({"id": str(position_id)}))
        return PositionOut(id=position_id, status="PENDING")

    @app.get("/positions/{position_id}")
    async def read(position_id: uuid.UUID, request: Request) -> dict[str, object]:
        row = await request.app.state.pool.fetchrow(_SELECT, position_id)
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such position")
        return {
            "id": str(row["id"]),
            "index": row["index_code"],
            "size": format(row["size"], "f"),
            "direction": row["direction"],
            "status": row["status"],
            "attempts": row["attempts"],
            "created_at": row["created_at"].isoformat(),
            "updated_at": row["updated_at"].isoformat(),
        }

    return app
