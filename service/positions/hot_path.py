"""The API's two hot paths, one statement each on a plain asyncpg pool (db.StatementPool).

- Accepting a position: the token check (revocation and expiry included), the credentials
  check and the INSERT of the PENDING row are one autocommitted statement; the task is pushed
  after it.
- Answering a poll: the token check and the primary-key read of the position's version are
  one statement; a 304 needs nothing more, and a full body already rendered for that version
  is served from memory.

Each answers only the common case. Anything else (no such token, a replayed or concurrent
Idempotency-Key, no credentials stored, an unknown index, a size the filters refuse, market
data missing or stale, a body not rendered yet) returns None, and the endpoint takes the full
path in service/positions/service.py, which gives the same answers, in the same order, as
it always has. A refusal therefore writes nothing and says what it always said.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass

import asyncpg

from service.budgets import ADMISSION_WAIT_SECONDS, OPEN_STATUSES_SQL, crowded
from service.db import StatementPool
from service.errors import DomainError
from service.indices.cache import IndexCache
from service.market.snapshot import MarketSnapshot
from service.models import PositionStatus
from service.positions.locks import admission_lock_keys
from service.positions.service import (
    AcceptedPosition,
    OpenRequest,
    check_tradeable,
    etag_of,
    request_fingerprint,
)
from service.queue import RedisTaskPublisher
from service.security import hash_token

# One statement: the caller's live token, their stored credentials, their open-positions
# budget (strict: the statement runs after its transaction took the user's admission lock,
# service/budgets.py), the row. ON CONFLICT: a taken Idempotency-Key inserts nothing (the
# full path replays it). Its transaction commits before the task is pushed, so the row is
# durable by then.
# (Built with OPEN_STATUSES_SQL: the enum's own values, no input.)
_ACCEPT = f"""
INSERT INTO synthetic_positions
    (id, user_id, index_code, size, direction, status, attempts, idempotency_key,
     request_fingerprint, execution)
SELECT $1, t.user_id, $3, $4, $5, $6, 0, $7, $8, $9
FROM api_tokens AS t
WHERE t.token_hash = $2 AND t.revoked_at IS NULL AND t.expires_at > now()
  AND EXISTS (SELECT 1 FROM exchange_credentials AS c WHERE c.user_id = t.user_id)
  AND (SELECT count(*) FROM (
         SELECT 1 FROM synthetic_positions AS o
         WHERE o.user_id = t.user_id AND o.status IN ({OPEN_STATUSES_SQL})
         LIMIT $10) AS open) < $10
ON CONFLICT DO NOTHING
RETURNING created_at, updated_at
"""  # noqa: S608

# The version of a position as its owner's live token sees it: what the ETag is made of.
_VERSION = """
SELECT p.updated_at, p.attempts
FROM synthetic_positions AS p
JOIN api_tokens AS t ON t.user_id = p.user_id
WHERE p.id = $1 AND t.token_hash = $2 AND t.revoked_at IS NULL AND t.expires_at > now()
"""


async def accept_position(
    pool: StatementPool,
    publisher: RedisTaskPublisher,
    request: OpenRequest,
    *,
    token: str | None,
    market: MarketSnapshot | None,
    indices: IndexCache,
    open_limit: int,
    user_id: uuid.UUID | None,
) -> AcceptedPosition | None:
    """The new PENDING position, committed and its task pushed; None when this request is
    not the common case (the full path answers it), the open-positions budget (`open_limit`)
    included. `user_id`: whom the token names (budgets.UserIds; None: unknown, the full path
    answers), whose admission lock the statement's transaction takes."""
    index_code, size, direction = request.index_code, request.size, request.direction
    idempotency_key = request.idempotency_key
    index = indices.peek(index_code)
    if not token or index is None or user_id is None:
        return None
    try:
        check_tradeable(index, size, direction, market)
    except DomainError:
        return None
    position_id = uuid.uuid4()
    fingerprint = (
        request_fingerprint(index_code, size, direction, request.execution)
        if idempotency_key
        else None
    )
    try:
        row = await pool.fetchrow_in_turn(
            admission_lock_keys(user_id),
            ADMISSION_WAIT_SECONDS,
            _ACCEPT,
            position_id,
            hash_token(token),
            index.code,
            size,
            direction.value,
            PositionStatus.PENDING.value,
            idempotency_key,
            fingerprint,
            request.execution.value,
            open_limit,
        )
    except asyncpg.exceptions.LockNotAvailableError:
        raise crowded() from None
    if row is None:
        return None
    # If this push is lost, the recovery sweep re-sends the PENDING position.
    await publisher.try_publish(position_id)
    return AcceptedPosition(
        id=position_id,
        index_code=index.code,
        size=size,
        direction=direction.value,
        execution=request.execution.value,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


async def position_etag(
    pool: StatementPool, token: str | None, position_id: uuid.UUID, market_version: int
) -> str | None:
    """The ETag of the caller's position (valued at the market snapshot `market_version`);
    None when the token or the position is not found (the full path says which)."""
    if not token:
        return None
    row = await pool.fetchrow(_VERSION, position_id, hash_token(token))
    if row is None:
        return None
    return etag_of(position_id, row["updated_at"], row["attempts"], market_version)


@dataclass(frozen=True, slots=True)
class _Rendered:
    tag: str
    body: bytes


class RenderedPositions:
    """The last rendered body of recently polled positions, by ETag: the tag changes whenever
    anything the body shows changes (service.positions.service.etag), so a body stored for a
    tag is the body for that tag. Bounded; the least recently used is dropped first."""

    def __init__(self, *, capacity: int = 1024) -> None:
        self._capacity = capacity
        self._bodies: OrderedDict[uuid.UUID, _Rendered] = OrderedDict()

    def get(self, position_id: uuid.UUID, tag: str) -> bytes | None:
        rendered = self._bodies.get(position_id)
        if rendered is None or rendered.tag != tag:
            return None
        self._bodies.move_to_end(position_id)
        return rendered.body

    def put(self, position_id: uuid.UUID, tag: str, body: bytes) -> None:
        self._bodies[position_id] = _Rendered(tag, body)
        self._bodies.move_to_end(position_id)
        while len(self._bodies) > self._capacity:
            self._bodies.popitem(last=False)
