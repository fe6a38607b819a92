"""PostgreSQL advisory locks of positions and exchange accounts, and the run's ownership proof
on the lock's own connection. The primitives under service/execution/run_lock.py, and the
fence every status write of a run carries (`lock_held_by`)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import TextClause

LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of a lock not granted within lock_timeout


def advisory_lock_key(position_id: uuid.UUID) -> int:
    """A signed 64-bit key for PostgreSQL's advisory locks, derived from the position id."""
    return int.from_bytes(position_id.bytes[:8], "big", signed=True)


def _lock_params(position_id: uuid.UUID) -> dict[str, int]:
    # pg_locks shows a bigint advisory key as two oids: its high and low 32 bits.
    key = advisory_lock_key(position_id)
    return {"lock_high": (key >> 32) & 0xFFFFFFFF, "lock_low": key & 0xFFFFFFFF}


_LOCK_HELD = (
    "EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
    " AND classid::bigint = :lock_high AND objid::bigint = :lock_low{holder})"
)


# The run's ownership proof (confirm_run), on its lock connection: lock, status and claim,
# and the heartbeat renewed. $1 the id, $2 the claim, $5 and $6 the lock key's halves.
_OWNER = """owner AS (
    UPDATE synthetic_positions SET heartbeat_at = now(){also}
    WHERE id = $1 AND status = '{status}' AND claim = $2 AND EXISTS (
        SELECT 1 FROM pg_locks
        WHERE locktype = 'advisory' AND granted AND objsubid = 1 AND classid::bigint = $5
          AND objid::bigint = $6 AND pid = pg_backend_pid())
    RETURNING id
)"""

# A close round's proof: its legs are in position_close_legs. $3 the legs marked submitted,
# $4 the remainder, $7 the close round.
_CONFIRM_CLOSING = f"""
WITH {_OWNER.format(status="CLOSING", also="")}, submitted AS (
    UPDATE position_close_legs
    SET submitted_at = coalesce(submitted_at, now()),
        remainders_submitted = greatest(remainders_submitted, $4::integer)
    WHERE position_id IN (SELECT id FROM owner) AND leg = ANY($3::integer[])
      AND round = $7::integer
    RETURNING leg
)
SELECT count(*) FROM owner
"""  # noqa: S608 - constants only; every value is a bound parameter

# The opening's proof: the same on position_legs, and its pre-flight's facts written in the
# same round trip (one UPDATE per row: a statement may change a row once): $7 the key's Bybit
# account (NULL: nothing to write; the first reading stands), $8 the legs whose positionIdx
# changed and $9 their positionIdx.
_OPENING_OWNER = _OWNER.format(
    status="EXECUTING", also=", exchange_uid = coalesce(exchange_uid, $7::text)"
)
_CONFIRM_OPENING = f"""
WITH {_OPENING_OWNER}, facts AS (
    SELECT * FROM unnest($8::integer[], $9::integer[]) AS f(leg, position_idx)
), submitted AS (
    UPDATE position_legs AS l
    SET submitted_at = CASE WHEN l.leg = ANY($3::integer[])
                            THEN coalesce(l.submitted_at, now()) ELSE l.submitted_at END,
        remainders_submitted = CASE WHEN l.leg = ANY($3::integer[])
                                    THEN greatest(l.remainders_submitted, $4::integer)
                                    ELSE l.remainders_submitted END,
        position_idx = coalesce((SELECT f.position_idx FROM facts AS f WHERE f.leg = l.leg),
                                l.position_idx)
    WHERE l.position_id IN (SELECT id FROM owner)
      AND (l.leg = ANY($3::integer[]) OR l.leg IN (SELECT leg FROM facts))
    RETURNING l.leg
)
SELECT count(*) FROM owner
"""  # noqa: S608 - constants only; every value is a bound parameter


_THIS_DATABASE = " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"


def lock_held_by(position_id: uuid.UUID, pid: int) -> TextClause:
    """A condition: the position's run lock is held by backend `pid` (the run's lock
    connection). A status write with it cannot be made by a run that lost its lock."""
    return text(_LOCK_HELD.format(holder=" AND pid = :lock_pid")).bindparams(
        lock_pid=pid, **_lock_params(position_id)
    )


def no_run_holds(position_id: uuid.UUID) -> TextClause:
    """A condition: no connection of this database holds the position's run lock (a run is
    not in progress). The recovery sweep's write carries it, so a run that starts between the
    sweep's look and its write keeps the position."""
    return text("NOT " + _LOCK_HELD.format(holder=_THIS_DATABASE)).bindparams(
        **_lock_params(position_id)
    )


async def try_advisory_lock(connection: asyncpg.Connection, position_id: uuid.UUID) -> int | None:
    """Take the position's session-level lock, held by the connection until released or the
    connection dies. Returns the connection's backend pid (what its status writes are fenced
    with), or None when another connection holds the lock."""
    row = await connection.fetchrow(
        "SELECT pg_try_advisory_lock($1), pg_backend_pid()", advisory_lock_key(position_id)
    )
    assert row is not None
    acquired, pid = row
    return int(pid) if acquired else None


async def unlock_all(connection: asyncpg.Connection) -> None:
    """Let go of every session-level advisory lock the connection holds."""
    await connection.fetchval("SELECT pg_advisory_unlock_all()")


def account_lock_keys(user_id: uuid.UUID) -> tuple[int, int]:
    """The two-int advisory lock key of a user's exchange account (the service keeps one
    Bybit key per user, so a user is an account, whichever key it stores at the moment).

    PostgreSQL keeps two-int keys apart from the bigint keys of positions (`objsubid` 2
    against 1), so an account's lock can never collide with a position's."""
    raw = user_id.bytes[:8]
    return (
        int.from_bytes(raw[:4], "big", signed=True),
        int.from_bytes(raw[4:], "big", signed=True),
    )


def admission_lock_keys(user_id: uuid.UUID) -> tuple[int, int]:
    """The two-int advisory lock key under which one user's admissions (a count of their open
    positions and the write it allows: service/budgets.py) take turns, held by the writing
    transaction (`pg_advisory_xact_lock`). Hashed with its own label, so that it never equals
    an account's key (`account_lock_keys`, the user id's first bytes)."""
    raw = hashlib.sha256(b"admission:" + user_id.bytes).digest()[:8]
    return (
        int.from_bytes(raw[:4], "big", signed=True),
        int.from_bytes(raw[4:], "big", signed=True),
    )


async def lock_account(
    connection: asyncpg.Connection, user_id: uuid.UUID, *, wait_seconds: float = 0.0
) -> bool:
    """Take the account's session-level lock: at once, or waiting in PostgreSQL's queue (first
    come, first served) at most `wait_seconds`. False when it was not granted. The connection
    must be in autocommit mode; the wait's lock_timeout is local to its one statement."""
    first, second = account_lock_keys(user_id)
    if wait_seconds <= 0:
        return bool(await connection.fetchval("SELECT pg_try_advisory_lock($1, $2)", first, second))
    try:
        await connection.fetchval(
            "WITH wait AS MATERIALIZED (SELECT set_config('lock_timeout', $3, true)) "
            "SELECT pg_advisory_lock($1, $2) FROM wait",
            first,
            second,
            str(max(1, int(wait_seconds * 1000))),
        )
        return True
    except asyncpg.PostgresError as error:
        if getattr(error, "sqlstate", None) != LOCK_NOT_AVAILABLE:
            raise
        return False


async def unlock_account(connection: asyncpg.Connection, user_id: uuid.UUID) -> None:
    first, second = account_lock_keys(user_id)
    await connection.fetchval("SELECT pg_advisory_unlock($1, $2)", first, second)


async def confirm_run(
    connection: asyncpg.Connection,
    position_id: uuid.UUID,
    claim: str,
    *,
    submitting_legs: Sequence[int] = (),
    submitting_remainder: int = 0,
    close_round: int | None = None,
    exchange_uid: str | None = None,
    position_idx: Mapping[int, int] | None = None,
) -> bool:
    """One round trip on the connection that holds the run's lock: True when this connection
    still holds the position's lock and the position is still EXECUTING under `claim`. Then
    the heartbeat is renewed (the recovery sweep waits STALE_EXECUTING_SECONDS after it before
    it may resume the position elsewhere) and the orders of `submitting_legs` (their first,
    or remainder number `submitting_remainder`) are marked submitted (before they are sent: a
    later run looks them up before placing anything): one leg's order, or a batch's. The
    opening's pre-flight facts go with it: the key's Bybit account (`exchange_uid`, kept if
    one is stored) and each leg's `position_idx` by leg. A plain asyncpg statement: it comes
    before every order, on the loop that sends it."""
    lock = _lock_params(position_id)
    common = (position_id, claim, list(submitting_legs), submitting_remainder)
    keys = (lock["lock_high"], lock["lock_low"])
    if close_round is not None:
        count = await connection.fetchval(_CONFIRM_CLOSING, *common, *keys, close_round)
    else:
        changed = position_idx or {}
        count = await connection.fetchval(
            _CONFIRM_OPENING, *common, *keys, exchange_uid, list(changed), list(changed.values())
        )
    return bool(count)


async def is_run_alive(session: AsyncSession, position_id: uuid.UUID) -> bool:
    """True when some connection holds the position's run lock (a run is in progress).

    Read from pg_locks rather than by trying the lock: taking it, even for an instant, would
    turn away a run that starts at that moment."""
    result = await session.execute(
        text("SELECT " + _LOCK_HELD.format(holder=_THIS_DATABASE)), _lock_params(position_id)
    )
    return bool(result.scalar_one())
