"""What is known about an exchange account's symbols, remembered for every worker: whether a
symbol's leverage is 1x, and its position mode (one-way or hedge).

Each costs an exchange call to learn, against Bybit's per-account and per-address limits: a
basket that asked for them on every symbol every time spent ten or twenty calls on what had not
changed. A confirmation is trusted for a while (a change made by hand on the exchange is
caught after that, and a wrong position mode is corrected by the order it spoils, which places
nothing), in Redis so that every worker shares it; an in-process memo serves tests and one-off
commands.
"""

from __future__ import annotations

import contextlib
import time
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

LEVERAGE_TTL_SECONDS = 300.0
POSITION_MODE_TTL_SECONDS = 3600.0


class AccountMemo(Protocol):
    async def leverage_confirmed(self, account: str, symbol: str) -> bool: ...

    async def confirm_leverage(self, account: str, symbol: str) -> None: ...

    async def hedge_mode(self, account: str, symbol: str) -> bool | None:
        """True for hedge mode, False for one-way, None when not known."""
        ...

    async def remember_hedge_mode(self, account: str, symbol: str, hedge: bool) -> None: ...


class LocalAccountMemo:
    def __init__(self) -> None:
        self._values: dict[tuple[str, str, str], tuple[str, float]] = {}

    def _get(self, kind: str, account: str, symbol: str, ttl: float) -> str | None:
        found = self._values.get((kind, account, symbol))
        if found is None or time.monotonic() - found[1] >= ttl:
            return None
        return found[0]

    async def leverage_confirmed(self, account: str, symbol: str) -> bool:
        return self._get("leverage", account, symbol, LEVERAGE_TTL_SECONDS) is not None

    async def confirm_leverage(self, account: str, symbol: str) -> None:
        self._values[("leverage", account, symbol)] = ("1", time.monotonic())

    async def hedge_mode(self, account: str, symbol: str) -> bool | None:
        found = self._get("mode", account, symbol, POSITION_MODE_TTL_SECONDS)
        return None if found is None else found == "hedge"

    async def remember_hedge_mode(self, account: str, symbol: str, hedge: bool) -> None:
        self._values[("mode", account, symbol)] = (
            "hedge" if hedge else "one_way",
            time.monotonic(),
        )


class RedisAccountMemo:
    def __init__(self, redis: aioredis.Redis, prefix: str = "trader:account") -> None:
        self._redis = redis
        self._prefix = prefix

    def _key(self, kind: str, account: str, symbol: str) -> str:
        return f"{self._prefix}:{kind}:{account}:{symbol}"

    async def leverage_confirmed(self, account: str, symbol: str) -> bool:
        try:
            return bool(await self._redis.exists(self._key("leverage", account, symbol)))
        except RedisError:
            return False  # unknown: set it again (110043 says "already so")

    async def confirm_leverage(self, account: str, symbol: str) -> None:
        # Only a saving: if Redis cannot take it, the next basket asks again.
        with contextlib.suppress(RedisError):
            await self._redis.set(
                self._key("leverage", account, symbol), 1, px=int(LEVERAGE_TTL_SECONDS * 1000)
            )

    async def hedge_mode(self, account: str, symbol: str) -> bool | None:
        try:
            raw = await self._redis.get(self._key("mode", account, symbol))
        except RedisError:
            return None
        return None if raw is None else raw == b"hedge"

    async def remember_hedge_mode(self, account: str, symbol: str, hedge: bool) -> None:
        with contextlib.suppress(RedisError):
            await self._redis.set(
                self._key("mode", account, symbol),
                "hedge" if hedge else "one_way",
                px=int(POSITION_MODE_TTL_SECONDS * 1000),
            )
