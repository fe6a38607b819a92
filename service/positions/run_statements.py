"""A run's hot statements, each one plain asyncpg statement on the run's lock connection
(`RunLease.fetch`, service/execution/run_lock.py), committed on its own.

Every basket makes them between its task's start and its ACTIVE row, on the one event loop
that also sends its orders: read through the ORM's unit of work (a session, BEGIN, the
statement, COMMIT), each cost about ten times its own CPU. They say the same as their ORM
counterparts in repository.py and carry the same fences: a status write requires that the
lock connection (`pg_backend_pid()`: the statement runs on it) still holds the position's
lock, so a run that lost its lock cannot write.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from service.models import PositionLeg, SyntheticPosition
from service.positions.locks import advisory_lock_key


class RunLease(Protocol):
    """What these statements run on: the run's lock connection
    (service/execution/run_lock.py)."""

    async def fetch(self, query: str, *args: object) -> list[Any]: ...


# The columns this code knows, named: a column a later migration adds (migrations run before
# the workers are replaced) is not handed to a model that does not know it.
_POSITION_COLUMNS = ", ".join(f'"{c.name}"' for c in SyntheticPosition.__table__.columns)
_LEG_COLUMNS = ", ".join(f'"{c.name}"' for c in PositionLeg.__table__.columns)

# The position's run lock held by this very connection (the statement runs on it). $1 is the
# position's lock key (locks.advisory_lock_key); pg_locks shows a bigint advisory key as two
# oids, its high and low 32 bits.
_LOCK_HELD_HERE = """EXISTS (
    SELECT 1 FROM pg_locks
    WHERE locktype = 'advisory' AND granted AND objsubid = 1 AND pid = pg_backend_pid()
      AND classid::bigint = ($1::bigint >> 32) & 4294967295
      AND objid::bigint = $1::bigint & 4294967295)"""

_POSITION = f"SELECT {_POSITION_COLUMNS} FROM synthetic_positions WHERE id = $1"  # noqa: S608

# Another basket of the account that has begun and not ended: the account is its until it is
# final, between its retries too (service/execution/accounts.py).
_HOLDER = """
SELECT id FROM synthetic_positions
WHERE user_id = $1 AND id <> $2
  AND (status = 'EXECUTING' OR (status = 'CLOSING' AND claim IS NOT NULL))
ORDER BY created_at
LIMIT 1
"""

_KEY = """
SELECT api_key_encrypted, api_secret_encrypted FROM exchange_credentials WHERE user_id = $1
"""

# PENDING -> EXECUTING under the run's claim (repository.compare_and_set_status). $1 the lock
# key, $2 the id, $3 the claim.
_CLAIM_NEW = f"""
UPDATE synthetic_positions
SET status = 'EXECUTING', claim = $3, heartbeat_at = now(), attempts = attempts + 1,
    next_attempt_at = NULL, account_wait_since = NULL, updated_at = clock_timestamp()
WHERE id = $2 AND status = 'PENDING' AND {_LOCK_HELD_HERE}
RETURNING {_POSITION_COLUMNS}
"""  # noqa: S608 - constants only; every value is a bound parameter

# The `trades` columns of a fill, in FillValues' order, with their arrays' types.
_FILL_COLUMNS = (
    ("leg", "integer"),
    ("symbol", "text"),
    ("side", "text"),
    ("bybit_order_id", "text"),
    ("order_link_id", "text"),
    ("price", "numeric"),
    ("quantity", "numeric"),
    ("fee", "numeric"),
    ("fee_coin", "text"),
    ("fee_detail", "text"),
    ("order_status", "text"),
    ("phase", "text"),
    ("executed_at", "timestamptz"),
)


def _fill_array(name: str, first: int) -> str:
    """The parameter of the fills' column `name`, their arrays numbered from `first`."""
    index = [column for column, _ in _FILL_COLUMNS].index(name)
    return f"${first + index}::{_FILL_COLUMNS[index][1]}[]"


def _insert_fills(position: int, first: int) -> str:
    """The INSERT of fills of the position ${position}: one unnest() of the arrays ${first}
    on (FillValues' fields), each fill inserted once (a second report of the same
    orderLinkId changes nothing)."""
    names = ", ".join(name for name, _ in _FILL_COLUMNS)
    arrays = ", ".join(_fill_array(name, first) for name, _ in _FILL_COLUMNS)
    values = ", ".join(
        f"t.{name}::jsonb" if name == "fee_detail" else f"t.{name}" for name, _ in _FILL_COLUMNS
    )
    return f"""
    INSERT INTO trades (id, position_id, {names})
    SELECT gen_random_uuid(), ${position}, {values}
    FROM unnest({arrays}) AS t({names})
    ON CONFLICT (order_link_id) DO NOTHING"""  # noqa: S608 - constants; values are bound


# EXECUTING -> ACTIVE under the run's claim, with the fills read last ($4...: a complete
# batch's, recorded in the same commit as its ACTIVE; none for a sequential run, which has
# recorded each already) and the snapshot of what filled (each leg's side and the sum of its
# opening fills) written in the same statement, hence the same commit: the status and the
# snapshot only if the status changed; the fills in any case (orders this run saw filled,
# whoever finishes the position; when it is not this run's, a new one still moves
# `updated_at`: GET shows it). The snapshot counts the fills given here as given, and the
# table's other rows: a statement's parts see the table as it was when it began, so neither
# the rows it inserts nor one another transaction committed while it waited to insert the
# same order's (then skipped) would be in it. Returns what filled per leg (no row: the
# position was not this run's to finish).
_FINISH = f"""
WITH recorded AS ({_insert_fills(2, 4)}
    RETURNING 1
), done AS (
    UPDATE synthetic_positions
    SET status = 'ACTIVE', account_wait_since = NULL, next_attempt_at = NULL,
        updated_at = clock_timestamp()
    WHERE id = $2 AND status = 'EXECUTING' AND claim = $3 AND {_LOCK_HELD_HERE}
    RETURNING id
), touched AS (
    -- Never the row `done` changed (a statement changes a row once).
    UPDATE synthetic_positions SET updated_at = clock_timestamp(), heartbeat_at = now()
    WHERE id = $2 AND EXISTS (SELECT 1 FROM recorded) AND NOT EXISTS (SELECT 1 FROM done)
), filled AS (
    SELECT l.leg, l.symbol, l.side, coalesce(sum(t.quantity), 0) AS quantity
    FROM position_legs AS l
    LEFT JOIN (
        SELECT leg, quantity FROM trades
        WHERE position_id = $2 AND phase = 'open'
          AND order_link_id <> ALL({_fill_array("order_link_id", 4)})
        UNION ALL
        SELECT f.leg, f.quantity
        FROM unnest({_fill_array("leg", 4)}, {_fill_array("quantity", 4)},
                    {_fill_array("phase", 4)}) AS f(leg, quantity, phase)
        WHERE f.phase = 'open'
    ) AS t ON t.leg = l.leg
    WHERE l.position_id = $2
    GROUP BY l.leg, l.symbol, l.side
), written AS (
    INSERT INTO position_components (id, position_id, symbol, side, expected_quantity)
    SELECT gen_random_uuid(), done.id, filled.symbol, filled.side, filled.quantity
    FROM filled, done
    RETURNING 1
)
SELECT filled.leg, filled.quantity FROM filled, done
"""  # noqa: S608 - constants only; every value is a bound parameter

# A new basket's plan, its legs in leg order, and the position's `updated_at` moved (GET shows
# the plan): one statement.
_ADD_PLAN = f"""
WITH legs AS (
    INSERT INTO position_legs
        (position_id, leg, symbol, side, quantity, reference_price, order_link_id)
    SELECT $1, * FROM unnest($2::integer[], $3::text[], $4::text[], $5::numeric[],
                             $6::numeric[], $7::text[])
    RETURNING {_LEG_COLUMNS}
), touched AS (
    UPDATE synthetic_positions SET updated_at = clock_timestamp() WHERE id = $1
)
SELECT * FROM legs ORDER BY leg
"""  # noqa: S608 - constants only; every value is a bound parameter

# Fills of the position $1, each inserted once (a second report of the same orderLinkId
# changes nothing) and, when one is new, the position's `updated_at` (GET shows it) and
# heartbeat (the run is alive) moved: one statement for any number of fills.
_RECORD_FILLS = f"""
WITH recorded AS ({_insert_fills(1, 2)}
    RETURNING 1
)
UPDATE synthetic_positions SET updated_at = clock_timestamp(), heartbeat_at = now()
WHERE id = $1 AND EXISTS (SELECT 1 FROM recorded)
"""  # noqa: S608 - constants only; every value is a bound parameter

_UUID_COLUMNS = ("id", "user_id")


def _columns(rows: Sequence[Any], row_type: type) -> list[list[Any]]:
    """Rows of a dataclass as one array per field, in field order: the parameters of the
    statement's unnest() (a mapping goes as its JSON text)."""
    columns = []
    for field in fields(row_type):
        values = (getattr(row, field.name) for row in rows)
        columns.append([json.dumps(v) if isinstance(v, Mapping) else v for v in values])
    return columns


def _position(row: Any) -> SyntheticPosition:
    """A position object (not attached to any session) from its row."""
    values = dict(row)
    for column in _UUID_COLUMNS:
        values[column] = uuid.UUID(bytes=values[column].bytes)
    return SyntheticPosition(**values)


async def position(lease: RunLease, position_id: uuid.UUID) -> SyntheticPosition | None:
    rows = await lease.fetch(_POSITION, position_id)
    return _position(rows[0]) if rows else None


async def add_plan(
    lease: RunLease, position_id: uuid.UUID, legs: Sequence[PlannedLegValues]
) -> list[PositionLeg]:
    """Store a new basket's plan; returns its legs as stored, in leg order."""
    rows = await lease.fetch(_ADD_PLAN, position_id, *_columns(legs, PlannedLegValues))
    stored = []
    for row in rows:
        values = dict(row)
        values["position_id"] = uuid.UUID(bytes=values["position_id"].bytes)
        stored.append(PositionLeg(**values))
    return stored


@dataclass(frozen=True, slots=True)
class FillValues:
    """The `trades` row of one filled order; the fields in the order of _FILL_COLUMNS."""

    leg: int
    symbol: str
    side: str
    bybit_order_id: str
    order_link_id: str
    price: Decimal
    quantity: Decimal
    fee: Decimal | None
    fee_coin: str | None
    fee_detail: Mapping[str, str] | None
    order_status: str
    phase: str
    executed_at: datetime


async def record_fills(
    lease: RunLease, position_id: uuid.UUID, fills: Sequence[FillValues]
) -> None:
    """A run's fills of its position, in one statement."""
    await lease.fetch(_RECORD_FILLS, position_id, *_columns(fills, FillValues))


async def holder_id(lease: RunLease, position: SyntheticPosition) -> uuid.UUID | None:
    """The id of another basket of the account that has begun and not ended, if any."""
    rows = await lease.fetch(_HOLDER, position.user_id, position.id)
    return uuid.UUID(bytes=rows[0]["id"].bytes) if rows else None


@dataclass(frozen=True, slots=True)
class PlannedLegValues:
    """A leg of a new plan; the fields in the order of _ADD_PLAN's arrays."""

    leg: int
    symbol: str
    side: str
    quantity: Decimal
    reference_price: Decimal
    order_link_id: str


@dataclass(frozen=True, slots=True)
class StoredKey:
    api_key_encrypted: str
    api_secret_encrypted: str


async def stored_key(lease: RunLease, user_id: uuid.UUID) -> StoredKey | None:
    rows = await lease.fetch(_KEY, user_id)
    if not rows:
        return None
    return StoredKey(rows[0]["api_key_encrypted"], rows[0]["api_secret_encrypted"])


async def claim_new(
    lease: RunLease, position_id: uuid.UUID, claim: str
) -> SyntheticPosition | None:
    """PENDING -> EXECUTING under `claim`; None, nothing written, when it was not PENDING (or
    this connection no longer holds its lock)."""
    rows = await lease.fetch(_CLAIM_NEW, advisory_lock_key(position_id), position_id, claim)
    return _position(rows[0]) if rows else None


async def finish_active(
    lease: RunLease, position_id: uuid.UUID, claim: str, fills: Sequence[FillValues] = ()
) -> dict[int, Decimal] | None:
    """`fills` recorded, and EXECUTING -> ACTIVE under `claim` with the snapshot, in one
    statement: what filled per leg; None, only the fills written, when the position was not
    this run's to finish."""
    rows = await lease.fetch(
        _FINISH,
        advisory_lock_key(position_id),
        position_id,
        claim,
        *_columns(fills, FillValues),
    )
    if not rows:
        return None
    return {int(row["leg"]): Decimal(row["quantity"]) for row in rows}
