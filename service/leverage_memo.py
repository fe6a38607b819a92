"""Which (account, symbol) pairs are known to be at 1x, remembered for every worker.

Setting leverage is a call against Bybit's per-account and per-address limits; a basket that
set it on every symbol every time spent ten calls on what was already so. A confirmation is
trusted for `ttl_seconds` (a change made by hand on the exchange is caught after that), in
Redis so that every worker shares it; an in-process memo serves tests and one-off commands.
"""

from __future__ import annotations

import contextlib
import time
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError


class LeverageMemo(Protocol):
    async def confirmed(self, account: str, symbol: str) -> bool: ...

    async def remember(self, account: str, symbol: str) -> None: ...


class LocalLeverageMemo:
    def __init__(self, ttl_seconds: float = 300.0) -> None:
        self._ttl = ttl_seconds
        self._seen: dict[tuple[str, str], float] = {}

    async def confirmed(self, account: str, symbol: str) -> bool:
        seen = self._seen.get((account, symbol))
        return seen is not None and time.monotonic() - seen < self._ttl

    async def remember(self, account: str, symbol: str) -> None:
        self._seen[(account, symbol)] = time.monotonic()


class RedisLeverageMemo:
    def __init__(
        self, redis: aioredis.Redis, ttl_seconds: float = 300.0, prefix: str = "trader:leverage"
    ) -> None:
        self._redis = redis
        self._ttl = ttl_seconds
        self._prefix = prefix

    def _key(self, account: str, symbol: str) -> str:
        return f"{self._prefix}:{account}:{symbol}"

    async def confirmed(self, account: str, symbol: str) -> bool:
        try:
            return bool(await self._redis.exists(self._key(account, symbol)))
        except RedisError:
            return False  # unknown: set it again (110043 says "already so")

    async def remember(self, account: str, symbol: str) -> None:
        # Only a saving: if Redis cannot take it, the next basket sets leverage again.
        with contextlib.suppress(RedisError):
            await self._redis.set(self._key(account, symbol), 1, px=int(self._ttl * 1000))
