"""The per-position run lock: a PostgreSQL advisory lock held on its own connection.

Two deliveries of one task can run at once (Redis redelivery, a duplicated retry message);
the lock serialises them. If the worker dies, PostgreSQL drops the connection and the lock
with it, which is also how the recovery job tells a dead run from a slow one.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncEngine

from service.execution import RunLock
from service.positions import repository


def advisory_run_lock(engine: AsyncEngine) -> RunLock:
    @asynccontextmanager
    async def hold(position_id: uuid.UUID) -> AsyncIterator[bool]:
        async with engine.connect() as connection:
            acquired = await repository.try_advisory_lock(connection, position_id)
            # The lock is session-level: end the implicit transaction, keep the connection.
            await connection.commit()
            try:
                yield acquired
            finally:
                if acquired:
                    await repository.advisory_unlock(connection, position_id)
                    await connection.commit()

    def open_lock(position_id: uuid.UUID) -> AbstractAsyncContextManager[bool]:
        return hold(position_id)

    return open_lock
