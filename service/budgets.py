"""Budgets per user, kept in Redis so that every API process shares them.

- A request rate: a token bucket per user (USER_REQUESTS_PER_MINUTE, bursts of
  USER_REQUEST_BURST), taken by every authenticated /api request in one Lua script (one round
  trip).
- The number of the user's positions not yet final (PENDING, EXECUTING, CLOSING;
  USER_OPEN_POSITIONS), for what adds to it: opening a position (a close reduces what the user
  holds, so it takes a rate token only). The count is read by PostgreSQL in the transaction
  that writes, after that transaction took the user's admission lock (an advisory lock,
  service/positions/locks.py `admission_lock_keys`, released by the commit): a count inside
  one INSERT alone is not strict under READ COMMITTED (two concurrent INSERTs each count the
  other's row as absent), while a count read after the previous admission of the same user has
  committed is. PostgreSQL holds the lock exactly as long as the transaction, whatever it
  waits on, and lets go of it with a connection that dies: no lease to outlive.
  In each process one user's admissions also queue in front of the pool (`admission`), so
  a flood by one user holds at most one database connection per process.

Past either budget: `TooManyRequestsError` (429 with Retry-After), raised before anything is
written.

Redis down: fail open. A budget is a protection against one user crowding out the others,
not a correctness condition; the shared exchange limiter (service/rate_limits.py), which
fails closed, still keeps the exchange calls inside Bybit's limits, and the open-positions
count is read in PostgreSQL, not here (strict whatever Redis does). Turning
every request into a 503 while Redis is away would stop the service for everyone to protect
it from one user.

The user a token belongs to is cached in the process for a few seconds (`UserIds`), to key
the budgets without a database read per request: it is never used to authenticate (the
token is checked by the request's own statement, as before).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from service.db import StatementPool
from service.errors import TooManyRequestsError
from service.models import PositionStatus
from service.security import hash_token

logger = structlog.stdlib.get_logger("service.budgets")

# The statuses the open-positions budget counts: every one that is not final.
OPEN_STATUSES: Final = tuple(s.value for s in PositionStatus if not s.is_final)
# The same as SQL literals, for the count's statements: written out (not a parameter) so that
# the planner uses the partial index of open positions (ix_synthetic_positions_user_open) even
# in a prepared statement's generic plan. Enum values: nothing to quote.
OPEN_STATUSES_SQL: Final = ", ".join(f"'{status}'" for status in OPEN_STATUSES)

# A request waits this long in all for its turn among the same user's admissions in this
# process, then is refused (429): that many concurrent opens of one user are a flood.
ADMISSION_WAIT_SECONDS: Final = 3.0
# When to come back after the open-positions budget refused: positions usually reach a final
# status within seconds.
OPEN_RETRY_AFTER_SECONDS: Final = 5

# KEYS[1]: the user's bucket (hash: tokens, ms). ARGV: tokens per ms, burst.
# Returns {0, 0}: admitted (a token taken); {1, wait ms}: over the rate (nothing taken).
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ms')
local tokens, last = tonumber(state[1]), tonumber(state[2])
if tokens == nil or last == nil then tokens, last = burst, now end
if now > last then tokens = math.min(burst, tokens + (now - last) * rate) end
if tokens < 1 then
  return {1, math.ceil((1 - tokens) / rate)}
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'ms', tostring(now))
-- Kept as long as it takes the bucket to fill again: a full bucket is no key at all.
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate) + 1000)
return {0, 0}
"""


def _seconds(ms: float) -> int:
    """Retry-After: whole seconds, at least 1."""
    return max(1, math.ceil(ms / 1000))


def crowded() -> TooManyRequestsError:
    """The answer when a user's admissions do not get their turn within ADMISSION_WAIT_SECONDS
    (in this process's queue, or at the database's admission lock)."""
    return TooManyRequestsError(
        "too many concurrent position requests of this user: each is admitted in turn "
        "against the open-positions budget; try again in 1 s",
        retry_after=1,
    )


@dataclass
class _LocalQueue:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    requests: int = 0  # in the queue or holding it


class Budgets:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        requests_per_minute: int,
        request_burst: int,
        open_positions: int,
        prefix: str = "trader:budget",
    ) -> None:
        self.requests_per_minute = requests_per_minute
        self.request_burst = request_burst
        self.open_positions = open_positions
        self._prefix = prefix
        self._rate_per_ms = requests_per_minute / 60_000
        self._take = redis.register_script(_TAKE)
        # One user's admissions in this process queue here, so that only one of them at a
        # time holds a database connection waiting for the user's admission lock.
        self._local: dict[uuid.UUID, _LocalQueue] = {}

    async def take_request(self, user_id: uuid.UUID) -> None:
        """One request of the user's rate budget, or TooManyRequestsError. Redis unreachable:
        admitted (fail open, see above)."""
        try:
            result = await self._take(
                keys=[f"{self._prefix}:rate:{user_id}"],
                args=[self._rate_per_ms, self.request_burst],
            )
        except RedisError as error:
            logger.warning("budget.unavailable", error=type(error).__name__)
            return
        if int(result[0]) == 1:
            wait_ms = int(result[1])
            raise TooManyRequestsError(
                f"request rate budget used up: at most {self.requests_per_minute} requests a "
                f"minute per user (bursts of {self.request_burst}); try again in "
                f"{_seconds(wait_ms)} s",
                retry_after=_seconds(wait_ms),
            )

    @asynccontextmanager
    async def admission(self, user_id: uuid.UUID) -> AsyncIterator[None]:
        """One request of the user's rate budget, then this process's turn among the user's
        admissions for the block: inside it, take the user's admission lock in the writing
        transaction, count the user's open positions and write, committed before the block
        ends."""
        await self.take_request(user_id)
        local = self._local.get(user_id)
        if local is None:
            local = self._local[user_id] = _LocalQueue()
        local.requests += 1
        try:
            try:
                async with asyncio.timeout(ADMISSION_WAIT_SECONDS):
                    await local.lock.acquire()
            except TimeoutError:
                raise crowded() from None
            try:
                yield
            finally:
                local.lock.release()
        finally:
            local.requests -= 1
            if not local.requests:
                del self._local[user_id]

    def open_positions_refused(self, open_count: int) -> TooManyRequestsError:
        return TooManyRequestsError(
            f"open positions budget used up: {open_count} of your positions are not final "
            f"yet (PENDING, EXECUTING or CLOSING), and at most {self.open_positions} may be; "
            f"try again in {OPEN_RETRY_AFTER_SECONDS} s, once one of them is ACTIVE, FAILED "
            "or CLOSED",
            retry_after=OPEN_RETRY_AFTER_SECONDS,
        )


# Who a token belongs to, cached this long: only to key budgets (a revoked token keeps its
# user's budget for at most this long, and is refused by its request's own check anyway).
USER_ID_TTL_SECONDS: Final = 30.0
_USER_IDS_KEPT: Final = 10_000

_OWNER_OF_HASH = (
    "SELECT user_id FROM api_tokens"
    " WHERE token_hash = $1 AND revoked_at IS NULL AND expires_at > now()"
)


class UserIds:
    """token hash -> user id, read from the database at most once per USER_ID_TTL_SECONDS per
    token and process. Never authentication: the budgets' key."""

    def __init__(self, *, ttl_seconds: float = USER_ID_TTL_SECONDS) -> None:
        self._ttl = ttl_seconds
        self._known: OrderedDict[str, tuple[uuid.UUID, float]] = OrderedDict()

    def remember(self, token: str, user_id: uuid.UUID) -> None:
        self._put(hash_token(token), user_id)

    def _put(self, token_hash: str, user_id: uuid.UUID) -> None:
        self._known[token_hash] = (user_id, time.monotonic() + self._ttl)
        self._known.move_to_end(token_hash)
        while len(self._known) > _USER_IDS_KEPT:
            self._known.popitem(last=False)

    async def of_token(self, pool: StatementPool, token: str | None) -> uuid.UUID | None:
        """The user the token names; None for no token or an unknown or revoked one (the
        request's own check answers it)."""
        if not token:
            return None
        token_hash = hash_token(token)
        known = self._known.get(token_hash)
        if known is not None and known[1] > time.monotonic():
            return known[0]
        row = await pool.fetchrow(_OWNER_OF_HASH, token_hash)
        if row is None:
            self._known.pop(token_hash, None)
            return None
        user_id: uuid.UUID = row["user_id"]
        self._put(token_hash, user_id)
        return user_id
