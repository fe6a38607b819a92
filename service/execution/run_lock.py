"""What a run holds for its whole length: PostgreSQL advisory locks on a connection of its own.

- The position's lock: two deliveries of one task can run at once (Redis redelivery, a
  duplicated retry message); the lock serialises them. If the worker dies, PostgreSQL drops
  the connection and the lock with it, which is how the recovery sweep tells a dead run from a
  slow one.
- The exchange account's lock: taken while a run checks that no other basket of the account
  has begun and not ended, claims its own, and runs it (service/execution/flow.py). With it, one
  basket at a time per account.
- The ownership proof: before each order the run asks, on this same connection, whether it
  still holds the lock and the claim. A session-level lock lives exactly as long as its
  connection, so a connection that answers still holds it; one that was terminated, or whose
  server vanished, cannot answer, and the run stops without placing the order.

The connection is in autocommit mode: the locks are session-level, and every statement on it
is one round trip. The run's own hot statements (service/positions/run_statements.py) run on
it too, as plain asyncpg statements (`fetch`): the ORM's unit of work around a one-statement
transaction (BEGIN, the statement, COMMIT) costs about ten times the statement's CPU, on the
event loop that sends the orders.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import asyncpg
import structlog
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from service.execution.deps import PreflightFacts, RunLease, RunLock
from service.positions import locks

logger = structlog.stdlib.get_logger("service.execution.run_lock")

# How long an ownership check or a release may take before it proves nothing.
CONFIRM_TIMEOUT_SECONDS = 5.0
# Errors that mean the lock connection cannot prove anything any more.
_CONNECTION_ERRORS = (
    SQLAlchemyError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)


class AdvisoryRunLease:
    def __init__(
        self,
        raw: asyncpg.Connection,
        position_id: uuid.UUID,
        pid: int,
        *,
        confirm_timeout: float,
    ) -> None:
        self._raw = raw
        self._position_id = position_id
        self._confirm_timeout = confirm_timeout
        # One statement at a time on the connection: a proof taken ahead may still be running
        # when the next is asked for.
        self._busy = asyncio.Lock()
        # A release that failed: the connection may still hold a lock.
        self._unreleased = False
        self.pid = pid  # the lock connection's backend: status writes are fenced with it

    async def confirm(
        self,
        claim: str,
        *,
        submitting_legs: Sequence[int] = (),
        submitting_remainder: int = 0,
        close_round: int | None = None,
        facts: PreflightFacts | None = None,
    ) -> bool:
        try:
            # The wait for the connection counts too: a statement before it may be slow.
            async with asyncio.timeout(self._confirm_timeout), self._busy:
                return await locks.confirm_run(
                    self._raw,
                    self._position_id,
                    claim,
                    submitting_legs=submitting_legs,
                    submitting_remainder=submitting_remainder,
                    close_round=close_round,
                    exchange_uid=facts.exchange_uid if facts is not None else None,
                    position_idx=facts.position_idx if facts is not None else None,
                )
        except _CONNECTION_ERRORS as error:
            logger.warning("run.lock_connection_lost", error=f"{type(error).__name__}: {error}")
            return False

    async def fetch(self, query: str, *args: object) -> list[asyncpg.Record]:
        """One statement on the lock connection, committed on its own (autocommit)."""
        async with self._busy:
            rows: list[asyncpg.Record] = await self._raw.fetch(query, *args)
            return rows

    @asynccontextmanager
    async def account(self, user_id: uuid.UUID, *, wait_seconds: float) -> AsyncIterator[bool]:
        async with self._busy:
            acquired = await locks.lock_account(self._raw, user_id, wait_seconds=wait_seconds)
        try:
            yield acquired
        finally:
            if acquired:
                await self._release(functools.partial(locks.unlock_account, self._raw, user_id))

    async def release(self) -> bool:
        """Every lock the connection holds let go (the account's too, should a cancellation
        have struck just after it was granted); False when that was not seen to happen."""
        return await self._release(functools.partial(locks.unlock_all, self._raw)) and (
            not self._unreleased
        )

    async def _release(self, unlock: Callable[[], Awaitable[None]]) -> bool:
        # A dead connection has released everything already; a live one answers quickly.
        try:
            async with asyncio.timeout(self._confirm_timeout), self._busy:
                await unlock()
            return True
        except _CONNECTION_ERRORS as error:
            logger.warning("run.lock_connection_lost", error=f"{type(error).__name__}: {error}")
            self._unreleased = True
            return False


def advisory_run_lock(
    engine: AsyncEngine, *, confirm_timeout: float = CONFIRM_TIMEOUT_SECONDS
) -> RunLock:
    """`confirm_timeout` bounds each ownership check and each release: a lock connection that
    does not answer in that time proves nothing."""

    @asynccontextmanager
    async def hold(position_id: uuid.UUID) -> AsyncIterator[RunLease | None]:
        async with engine.connect() as connection:
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            raw = (await connection.get_raw_connection()).driver_connection
            pid = await locks.try_advisory_lock(raw, position_id)
            if pid is None:
                yield None
                return
            lease = AdvisoryRunLease(raw, position_id, pid, confirm_timeout=confirm_timeout)
            released = False
            try:
                yield lease
            finally:
                try:
                    released = await lease.release()
                finally:
                    if not released:
                        # Not handed back to the pool holding a lock (a statement cancelled
                        # mid-way can keep the connection busy past the release's time):
                        # closed, so PostgreSQL drops whatever it held.
                        await connection.invalidate()

    def open_lock(position_id: uuid.UUID) -> AbstractAsyncContextManager[RunLease | None]:
        return hold(position_id)

    return open_lock
