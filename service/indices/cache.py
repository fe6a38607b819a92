"""The index catalogue as the API reads it: from the database at most every `ttl_seconds`.

The catalogue changes only when `python -m service seed` runs (a deploy), and every request
that opens a position needs it, so re-reading it per request would cost two queries for
nothing. A change is seen by every API process within `ttl_seconds`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from sqlalchemy.ext.asyncio import AsyncSession

from service.indices import repository
from service.models import Index


class IndexCache:
    def __init__(self, *, ttl_seconds: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self._ttl = ttl_seconds
        self._clock = clock
        self._indices: dict[str, Index] = {}
        self._loaded_at: float | None = None
        self._lock = asyncio.Lock()

    async def all(self, session: AsyncSession) -> Sequence[Index]:
        await self._refresh(session)
        return list(self._indices.values())

    async def get(self, session: AsyncSession, code: str) -> Index | None:
        await self._refresh(session)
        return self._indices.get(code)

    def peek(self, code: str) -> Index | None:
        """The index if the catalogue in memory is fresh, without any I/O; None when it is
        unknown or due for a reload (then `get` answers)."""
        if self._loaded_at is None or self._clock() - self._loaded_at >= self._ttl:
            return None
        return self._indices.get(code)

    async def _refresh(self, session: AsyncSession) -> None:
        if self._loaded_at is not None and self._clock() - self._loaded_at < self._ttl:
            return
        async with self._lock:  # one reload, however many requests arrive meanwhile
            if self._loaded_at is not None and self._clock() - self._loaded_at < self._ttl:
                return
            # Loaded with their components, the objects stay readable after the session.
            indices = await repository.list_indices(session)
            self._indices = {index.code: index for index in indices}
            self._loaded_at = self._clock()
