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
from collections.abc import Mapping, Sequence
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

LEVERAGE_TTL_SECONDS = 300.0
POSITION_MODE_TTL_SECONDS = 3600.0
# The account an API key belongs to never changes (a key of another account is another key,
# with another fingerprint): kept for a day, so a basket does not ask for it every time.
ACCOUNT_UID_TTL_SECONDS = 86400.0


class AccountMemo(Protocol):
    """Per account, for several symbols at once (one Redis round trip each)."""

    async def leverage_confirmed(self, account: str, symbols: Sequence[str]) -> set[str]:
        """The symbols whose leverage is known to be 1x."""
        ...

    async def confirm_leverage(self, account: str, symbols: Sequence[str]) -> None: ...

    async def hedge_modes(self, account: str, symbols: Sequence[str]) -> dict[str, bool]:
        """The known position modes: True for hedge mode, False for one-way (a symbol not
        known is left out)."""
        ...

    async def remember_hedge_modes(self, account: str, modes: Mapping[str, bool]) -> None: ...

    async def exchange_uid(self, account: str) -> str | None:
        """The UID of the Bybit account the key `account` (its fingerprint) belongs to."""
        ...

    async def remember_exchange_uid(self, account: str, uid: str) -> None: ...


class LocalAccountMemo:
    def __init__(self) -> None:
        self._values: dict[tuple[str, str, str], tuple[str, float]] = {}

    def _get(self, kind: str, account: str, symbol: str, ttl: float) -> str | None:
        found = self._values.get((kind, account, symbol))
        if found is None or time.monotonic() - found[1] >= ttl:
            return None
        return found[0]

    async def leverage_confirmed(self, account: str, symbols: Sequence[str]) -> set[str]:
        return {s for s in symbols if self._get("leverage", account, s, LEVERAGE_TTL_SECONDS)}

    async def confirm_leverage(self, account: str, symbols: Sequence[str]) -> None:
        for symbol in symbols:
            self._values[("leverage", account, symbol)] = ("1", time.monotonic())

    async def hedge_modes(self, account: str, symbols: Sequence[str]) -> dict[str, bool]:
        found = {s: self._get("mode", account, s, POSITION_MODE_TTL_SECONDS) for s in symbols}
        return {s: mode == "hedge" for s, mode in found.items() if mode is not None}

    async def remember_hedge_modes(self, account: str, modes: Mapping[str, bool]) -> None:
        for symbol, hedge in modes.items():
            self._values[("mode", account, symbol)] = (
                "hedge" if hedge else "one_way",
                time.monotonic(),
            )

    async def exchange_uid(self, account: str) -> str | None:
        return self._get("uid", account, "", ACCOUNT_UID_TTL_SECONDS)

    async def remember_exchange_uid(self, account: str, uid: str) -> None:
        self._values[("uid", account, "")] = (uid, time.monotonic())


# Every key set to its value with one time to live (ARGV[1], ms): one command for a basket's
# symbols, where a pipeline of SETs costs the event loop a command's encoding each.
_SET_ALL = """
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[i + 1], 'PX', ARGV[1])
end
return #KEYS
"""


class RedisAccountMemo:
    def __init__(self, redis: aioredis.Redis, prefix: str = "trader:account") -> None:
        self._redis = redis
        self._prefix = prefix
        self._set_all = redis.register_script(_SET_ALL)

    def _key(self, kind: str, account: str, symbol: str) -> str:
        return f"{self._prefix}:{kind}:{account}:{symbol}"

    async def _read(self, kind: str, account: str, symbols: Sequence[str]) -> dict[str, str]:
        if not symbols:
            return {}
        raw = await self._redis.mget([self._key(kind, account, s) for s in symbols])
        return {
            s: value.decode() if isinstance(value, bytes) else value
            for s, value in zip(symbols, raw, strict=True)
            if value is not None
        }

    async def _write(
        self, kind: str, account: str, values: Mapping[str, str], ttl_seconds: float
    ) -> None:
        if not values:
            return
        # Only a saving: if Redis cannot take it, the next basket asks again.
        with contextlib.suppress(RedisError):
            await self._set_all(
                keys=[self._key(kind, account, symbol) for symbol in values],
                args=[int(ttl_seconds * 1000), *values.values()],
            )

    async def leverage_confirmed(self, account: str, symbols: Sequence[str]) -> set[str]:
        try:
            return set(await self._read("leverage", account, symbols))
        except RedisError:
            return set()  # unknown: set it again (110043 says "already so")

    async def confirm_leverage(self, account: str, symbols: Sequence[str]) -> None:
        await self._write("leverage", account, dict.fromkeys(symbols, "1"), LEVERAGE_TTL_SECONDS)

    async def hedge_modes(self, account: str, symbols: Sequence[str]) -> dict[str, bool]:
        try:
            found = await self._read("mode", account, symbols)
        except RedisError:
            return {}
        return {s: raw == "hedge" for s, raw in found.items()}

    async def remember_hedge_modes(self, account: str, modes: Mapping[str, bool]) -> None:
        await self._write(
            "mode",
            account,
            {s: "hedge" if hedge else "one_way" for s, hedge in modes.items()},
            POSITION_MODE_TTL_SECONDS,
        )

    async def exchange_uid(self, account: str) -> str | None:
        try:
            return (await self._read("uid", account, [""])).get("")
        except RedisError:
            return None  # unknown: read from the exchange

    async def remember_exchange_uid(self, account: str, uid: str) -> None:
        await self._write("uid", account, {"": uid}, ACCOUNT_UID_TTL_SECONDS)
