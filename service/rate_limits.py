"""Bybit's rate limits, kept in Redis for every process that calls Bybit.

Bybit counts requests per account (UID) per endpoint in a rolling second (`order/create` 10,
`set-leverage` 10, the reads 50 by default), and per IP address: 600 in any five seconds, and
a breach bans the address for ten minutes or more, every key behind it included. Each worker
process counting for itself would breach both as soon as there are a few of them. So:

- every call takes a slot in a rolling-window log in Redis, one per (account, endpoint) and one
  per egress address, in one atomic script; a call whose window is full waits for the oldest
  slot to age out, if that is soon (`wait_max_seconds`), or fails as a transient error carrying
  the real wait;
- the address's window is sized at `share` of Bybit's limit (headroom for what we do not
  count: the clock's drift between Redis and Bybit, other software behind the address), since
  a breach bans every key behind it; an account's windows at Bybit's own limit, since a
  breach there (10006) places nothing and is sent again after the reset, while any headroom
  would hold back every 10-leg basket's last order for most of a second (Bybit allows exactly
  10 orders a second);
- what Bybit says is learnt: `X-Bapi-Limit` (the account's real limit, higher on VIP tiers)
  replaces the default in the process, and `X-Bapi-Limit-Status: 0` or a 10006 blocks the
  account's endpoint until `X-Bapi-Limit-Reset-Timestamp`;
- an IP ban (HTTP 403 or retCode 10018) pauses every call from the address until it ends.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from service.bybit.errors import BybitIpBanError, BybitNetworkError, BybitRateLimitError

logger = structlog.stdlib.get_logger("service.rate_limits")

# Bybit's defaults per account and second (rate-limit page, UTA, linear); others: 10.
ACCOUNT_LIMITS: Final[Mapping[str, int]] = {
    "/v5/order/create": 10,
    "/v5/order/create-batch": 10,
    "/v5/position/set-leverage": 10,
    "/v5/order/realtime": 50,
    "/v5/order/history": 50,
    "/v5/execution/list": 50,
    "/v5/position/list": 50,
    "/v5/account/wallet-balance": 50,
    "/v5/account/info": 50,
}
DEFAULT_ACCOUNT_LIMIT: Final = 10
IP_LIMIT: Final = 600  # per IP_WINDOW_MS
IP_WINDOW_MS: Final = 5000
# Bybit's second, padded: with the whole limit counted, the headroom is in time, for the
# requests that reach Bybit closer together than they left here (one delayed a little, the
# next not: 50 ms), and for a slot taken ahead, counted up to AHEAD_FRESH_SECONDS before its
# call is sent (50 ms more), so an 11th order is held 100 ms longer rather than refused with
# 10006.
ACCOUNT_WINDOW_MS: Final = 1100

# A slot taken ahead (`RedisCallGate.ahead`) stands for the call only this long after it was
# counted: the call reaches Bybit later than its slot says, and the account's window is
# padded for that lead as well as for the network's jitter (ACCOUNT_WINDOW_MS). A slot older
# than this is given back and a new one taken.
AHEAD_FRESH_SECONDS: Final = 0.05

# KEYS: windows (count = ARGV[2]), then blocks (the rest).
# ARGV: member, window count, then per window: limit, window ms, weight (the slots the call
# takes in it: a batch takes one per order in the account's window, one in the address's),
# then the member of a slot to give back first ('' for none: a slot taken ahead, too old).
# Returns {0} when the call may go, else {wait ms, 1 if it is a ban or block, index}.
_TAKE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local windows = tonumber(ARGV[2])
local release = ARGV[3 + 3 * windows]
if release ~= '' then
  -- Taken ahead with this call's weights: every one of its slots.
  for i = 1, windows do
    local weight = math.min(tonumber(ARGV[2 + 3 * i]), tonumber(ARGV[3 * i]))
    for slot = 1, weight do redis.call('ZREM', KEYS[i], release .. ':' .. slot) end
  end
end
local wait, blocked = 0, 0
for i = windows + 1, #KEYS do
  local left = redis.call('PTTL', KEYS[i])
  if left > wait then wait, blocked = left, 1 end
end
if wait > 0 then return {wait, blocked} end
for i = 1, windows do
  local limit, span = tonumber(ARGV[3 * i]), tonumber(ARGV[1 + 3 * i])
  local weight = math.min(tonumber(ARGV[2 + 3 * i]), limit)
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - span)
  local over = redis.call('ZCARD', KEYS[i]) + weight - limit
  if over > 0 then
    -- The call fits once the `over` oldest slots have aged out.
    local oldest = redis.call('ZRANGE', KEYS[i], over - 1, over - 1, 'WITHSCORES')
    local left = tonumber(oldest[2]) + span - now + 1
    if left > wait then wait = left end
  end
end
if wait > 0 then return {wait, 0} end
for i = 1, windows do
  local weight = math.min(tonumber(ARGV[2 + 3 * i]), tonumber(ARGV[3 * i]))
  for slot = 1, weight do
    redis.call('ZADD', KEYS[i], now, ARGV[1] .. ':' .. slot)
  end
  redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[1 + 3 * i]))
end
return {0, 0}
"""


# Slots taken ahead kept at most (a process runs one basket at a time per pool process; the
# entries are per path and account, and a basket's are used at once).
_AHEAD_KEPT: Final = 1000


@dataclass
class RedisCallGate:
    """The `CallGate` of service/bybit/client.py, shared through Redis."""

    redis: aioredis.Redis
    egress: str = "default"
    share: float = 0.9
    ip_limit: int = IP_LIMIT
    wait_max_seconds: float = 2.0
    prefix: str = "trader:limits"
    _learnt: dict[tuple[str, str], int] = field(default_factory=dict)
    # Slots taken ahead, by (path, account, weight), oldest first: each slot's member and the
    # task taking it (its result: the loop time it was counted).
    _ahead: dict[tuple[str, str | None, int], list[tuple[str, asyncio.Task[float]]]] = field(
        default_factory=dict
    )

    def __post_init__(self) -> None:
        self._script = self.redis.register_script(_TAKE_SLOT)

    def _ban_key(self) -> str:
        return f"{self.prefix}:ban:{self.egress}"

    def _account_key(self, kind: str, account: str, path: str) -> str:
        return f"{self.prefix}:{kind}:{account}:{path}"

    def ahead(self, path: str, account: str | None, count: int = 1, weight: int = 1) -> None:
        """Begin taking the slots of the next `count` calls to `path` for `account` now, while
        another call is in flight: those calls then go out without waiting on Redis (and on
        whatever else the event loop runs meanwhile). Each is taken for one call, used by a
        later `before` of the same path and account if still fresh (AHEAD_FRESH_SECONDS),
        else given back. A process runs one basket of an account at a time (the account
        lock), so the next such calls are that basket's. `weight`: what each of those calls
        counts against the account's limit (a batch: its orders); a call of another weight
        does not use them."""
        key = (path, account, weight)
        if key not in self._ahead and len(self._ahead) >= _AHEAD_KEPT:
            self._forget_ahead()
        slots = self._ahead.setdefault(key, [])
        while len(slots) < count:
            member = uuid.uuid4().hex
            task = asyncio.ensure_future(self._before(path, account, weight, member))
            # A slot dropped after its taking failed: its error is not the caller's.
            task.add_done_callback(_retrieved)
            slots.append((member, task))

    def _forget_ahead(self, *, path: str | None = None, account: str | None = None) -> None:
        """Slots taken ahead, forgotten (counted, they age out of the windows) and any still
        being taken stopped: all of them, or those of `path` and `account`."""
        for key in [k for k in self._ahead if path is None or k[:2] == (path, account)]:
            for _member, task in self._ahead.pop(key):
                task.cancel()

    def drop_ahead(self, account: str | None) -> None:
        """The account's slots taken ahead and not used: forgotten (counted, they age out
        of the windows), and any still being taken stopped."""
        for key in [key for key in self._ahead if key[1] == account]:
            for _member, task in self._ahead.pop(key):
                task.cancel()

    async def before(self, path: str, account: str | None, weight: int = 1) -> None:
        """Wait for a slot (at most `wait_max_seconds`), or raise a transient error that says
        how long the real wait is. `weight`: the slots the call takes in the account's window
        (a batch counts each of its orders, as Bybit does)."""
        release = ""
        key = (path, account, weight)
        slots = self._ahead.get(key)
        if slots:
            member, task = slots.pop(0)
            if not slots:
                del self._ahead[key]
            # Waited for here as the call's own would be; a refusal (a limit, a ban, Redis
            # gone) or a cancellation is not passed on: the call asks again, and is told. Not
            # waited for when done: that would let the loop run other work first.
            if not task.done():
                try:
                    await asyncio.wait([task])
                except asyncio.CancelledError:
                    task.cancel()  # nobody else would stop it
                    raise
            if not task.cancelled() and task.exception() is None:
                if asyncio.get_running_loop().time() - task.result() <= AHEAD_FRESH_SECONDS:
                    return
                release = member
        await self._before(path, account, weight, uuid.uuid4().hex, release=release)

    async def _before(
        self, path: str, account: str | None, weight: int, member: str, *, release: str = ""
    ) -> float:
        """Take the slot; returns the loop time just before the try that took it (the
        earliest the slot may have been counted: a slot taken ahead is as old as that)."""
        waited = 0.0
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            try:
                wait_ms, blocked = await self._take(path, account, weight, member, release)
            except RedisError as error:
                # No slot can be counted: nothing is sent (the run is retried), rather than
                # calls that could breach the limits for every process behind the address.
                raise BybitNetworkError(
                    f"the shared rate limiter is unreachable ({type(error).__name__})",
                    path=path,
                    ambiguous=False,
                ) from None
            release = ""  # given back by the first try
            if wait_ms <= 0:
                return asked
            wait = wait_ms / 1000
            if blocked and await self.redis.pttl(self._ban_key()) > 0:
                raise BybitIpBanError(
                    f"calls from this address are paused for {wait:.0f} s more: Bybit banned "
                    "it for breaching its IP limit",
                    path=path,
                    retry_after=wait,
                )
            if waited + wait > self.wait_max_seconds:
                raise BybitRateLimitError(
                    f"rate limit reached for {path}: the next slot is {wait:.1f} s away",
                    path=path,
                    retry_after=wait,
                )
            await asyncio.sleep(wait)
            waited += wait

    async def _take(
        self, path: str, account: str | None, weight: int, member: str, release: str
    ) -> tuple[int, int]:
        keys = [f"{self.prefix}:ip:{self.egress}"]
        # The address's limit counts requests; the account's counts orders.
        args: list[Any] = [member, 0, self._scaled(self.ip_limit), IP_WINDOW_MS, 1]
        blocks = [self._ban_key()]
        if account is not None:
            limit = self._learnt.get((account, path)) or ACCOUNT_LIMITS.get(
                path, DEFAULT_ACCOUNT_LIMIT
            )
            keys.append(self._account_key("window", account, path))
            args += [limit, ACCOUNT_WINDOW_MS, max(1, weight)]
            blocks.append(self._account_key("block", account, path))
        args[1] = len(keys)
        args.append(release)
        result = await self._script(keys=[*keys, *blocks], args=args)
        return int(result[0]), int(result[1])

    def _scaled(self, limit: int) -> int:
        return max(1, math.floor(limit * self.share))

    async def after(
        self,
        path: str,
        account: str | None,
        headers: Mapping[str, str],
        *,
        rate_limited: bool = False,
        reset_in_seconds: float | None = None,
    ) -> None:
        """Learn from the answer: the account's real limit for the endpoint, and whether it
        is used up until the reset."""
        if account is None:
            return
        limit = _int(headers.get("X-Bapi-Limit"))
        if limit is not None and limit > 0:
            self._learnt[(account, path)] = limit
        remaining = _int(headers.get("X-Bapi-Limit-Status"))
        # "0 remaining" means something only under a limit (an endpoint without one says 0).
        used_up = remaining == 0 and limit is not None and limit > 0
        if rate_limited or used_up:
            # A slot taken ahead for this endpoint was counted before the block.
            self._forget_ahead(path=path, account=account)
            # Until the reset Bybit names (a second, the window, when it names none).
            reset = 1.0 if reset_in_seconds is None else reset_in_seconds
            block_ms = max(1, math.ceil(reset * 1000))
            try:
                await self.redis.set(self._account_key("block", account, path), 1, px=block_ms)
            except RedisError as error:
                # The answer is what matters; the next call asks the limiter again.
                logger.warning("exchange.limits_unrecorded", error=type(error).__name__)

    async def ban(self, seconds: float) -> None:
        """Bybit banned the address: every process pauses its calls until the ban ends."""
        logger.error("exchange.ip_banned", egress=self.egress, pause_s=round(seconds))
        # A slot taken ahead was counted before the ban: none may stand for a call now.
        self._forget_ahead()
        try:
            await self.redis.set(self._ban_key(), 1, px=max(1, math.ceil(seconds * 1000)))
        except RedisError as error:
            logger.warning("exchange.limits_unrecorded", error=type(error).__name__)


def _retrieved(task: asyncio.Task[float]) -> None:
    if not task.cancelled():
        task.exception()


def _int(raw: str | None) -> int | None:
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        return None
