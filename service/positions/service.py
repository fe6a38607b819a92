"""Opening, closing and reading positions: this module writes a new PENDING row (and asks for
its task to be sent after the commit), and asks for a close through
service/positions/status.py, which makes every status change."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from service.budgets import ADMISSION_WAIT_SECONDS, OPEN_STATUSES_SQL, Budgets, crowded
from service.credentials.service import has_credentials
from service.db import ADMISSION_LOCK, LOCK_NOT_AVAILABLE, SessionScope, lock_timeout
from service.errors import (
    ConflictError,
    NotFoundError,
    ServiceUnavailableError,
    ValidationError,
)
from service.indices.cache import IndexCache
from service.market.snapshot import MarketSnapshot
from service.models import (
    ExecutionMode,
    Index,
    PositionCloseLeg,
    PositionComponent,
    PositionLeg,
    PositionStatus,
    ReconciliationIssue,
    SyntheticPosition,
    Trade,
    User,
)
from service.positions import reconciliation_rows, repository
from service.positions.locks import admission_lock_keys
from service.positions.status import Transition, change_status
from service.queue import publish_after_commit
from service.trading_logic import (
    CompositionError,
    Direction,
    MarketDataError,
    calculate_trade_composition,
)
from service.users import repository as users_repository


@dataclass(frozen=True, slots=True)
class AcceptedPosition:
    """A position this request has just written (service/positions/hot_path.py): PENDING with
    nothing else known yet, so no ORM object is needed to show it."""

    id: uuid.UUID
    index_code: str
    size: Decimal
    direction: str
    created_at: datetime
    updated_at: datetime
    execution: str = ExecutionMode.SEQUENTIAL.value
    status: str = PositionStatus.PENDING.value
    error: str | None = None
    failed_leg: int | None = None
    attempts: int = 0
    next_attempt_at: datetime | None = None
    account_wait_since: datetime | None = None
    close_round: int = 0
    close_error: str | None = None


@dataclass(frozen=True, slots=True)
class PositionDetail:
    position: SyntheticPosition | AcceptedPosition
    components: list[PositionComponent]
    trades: list[Trade]
    issues: list[ReconciliationIssue] = field(default_factory=list)
    plan: list[PositionLeg] = field(default_factory=list)
    # The legs of every close round (each with why it could not be closed, if so, and what
    # the exchange no longer held of it).
    close_plan: list[PositionCloseLeg] = field(default_factory=list)
    # The index's weight per symbol (the basket's target weights).
    weights: dict[str, Decimal] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OpenedPosition:
    position: SyntheticPosition
    created: bool  # False: the Idempotency-Key named an earlier request, this is its position


@dataclass(frozen=True, slots=True)
class PositionPage:
    items: list[PositionDetail]
    next_cursor: str | None


def request_fingerprint(
    index_code: str, size: Decimal, direction: Direction, execution: ExecutionMode
) -> str:
    """The same intent hashes the same: "100" and "100.00" are one size. The default
    execution is left out, so a body without it hashes as it did before the field existed."""
    intent = {
        "index": index_code,
        "size": format(size.normalize(), "f"),
        "direction": direction.value,
    }
    if execution != ExecutionMode.SEQUENTIAL:
        intent["execution"] = execution.value
    canonical = json.dumps(intent, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(existing: SyntheticPosition, fingerprint: str, key: str) -> OpenedPosition:
    if existing.request_fingerprint != fingerprint:
        raise ValidationError(
            f"Idempotency-Key {key!r} was already used with a different request body; "
            "use a new key for a new position"
        )
    return OpenedPosition(position=existing, created=False)


def check_tradeable(
    index: Index, size: Decimal, direction: Direction, market: MarketSnapshot | None
) -> None:
    """Refuse, before anything is written, a size the exchange's filters would refuse."""
    if market is None:
        raise ServiceUnavailableError(
            "market data is not available yet, so the size cannot be checked; "
            "try again in a few seconds"
        )
    components = list(index.components)
    try:
        calculate_trade_composition(components, size, direction, market.instruments, market.prices)
    except MarketDataError as error:
        if error.symbol not in market.instruments or error.symbol not in market.prices:
            raise ServiceUnavailableError(
                f"no market data for {error.symbol} yet; try again in a few seconds"
            ) from None
        raise ValidationError(f"index {index.code} cannot be traded now: {error}") from None
    except CompositionError as error:
        raise ValidationError(f"index {index.code}: {error}") from None
    except ArithmeticError:
        # Prices or steps the sizing arithmetic cannot carry (decimal.Overflow,
        # InvalidOperation...): a snapshot the parser let through but no exchange would
        # quote. The same answer as no snapshot, never a 500.
        raise ServiceUnavailableError(
            "market data is not usable right now, so the size cannot be checked; "
            "try again in a few seconds"
        ) from None


@dataclass(frozen=True, slots=True)
class OpenRequest:
    """What a POST /api/positions asks for, as both of its paths (hot_path.accept_position,
    open_position) take it."""

    index_code: str
    size: Decimal
    direction: Direction
    idempotency_key: str | None = None
    execution: ExecutionMode = ExecutionMode.SEQUENTIAL


async def open_position(
    session: AsyncSession,
    user: User,
    request: OpenRequest,
    *,
    market: MarketSnapshot | None,
    indices: IndexCache,
    budgets: Budgets | None = None,
) -> OpenedPosition:
    """`budgets`: the open-positions budget is checked (a replay is never refused by it),
    under the user's admission lock, taken here and held by the session's transaction until
    it ends (service/budgets.py)."""
    index_code, size, direction = request.index_code, request.size, request.direction
    idempotency_key = request.idempotency_key
    fingerprint = (
        request_fingerprint(index_code, size, direction, request.execution)
        if idempotency_key
        else None
    )
    if idempotency_key and fingerprint:
        existing = await repository.get_by_idempotency_key(session, user.id, idempotency_key)
        if existing is not None:
            return _replay(existing, fingerprint, idempotency_key)
    index = await indices.get(session, index_code)
    if index is None:
        known = ", ".join(i.code for i in await indices.all(session))
        raise ValidationError(f"unknown index {index_code!r}; known indices: {known}")
    check_tradeable(index, size, direction, market)
    if budgets is not None:
        await _check_open_budget(session, user, budgets)
    position = await repository.add_position(
        session,
        user_id=user.id,
        index_code=index.code,
        size=size,
        direction=direction.value,
        execution=request.execution.value,
        idempotency_key=idempotency_key,
        request_fingerprint=fingerprint,
    )
    if position is not None:
        # Sent once the request's transaction has committed, so the worker finds the row.
        publish_after_commit(session, position.id)
        return OpenedPosition(position=position, created=True)
    if not await has_credentials(session, user.id):
        raise ConflictError("no Bybit credentials stored: PUT /api/credentials first")
    # A concurrent request with the same key won the insert.
    if idempotency_key is None or fingerprint is None:  # pragma: no cover - no key, no conflict
        raise ConflictError("position could not be created; retry")
    winner = await repository.get_by_idempotency_key(session, user.id, idempotency_key)
    if winner is None:  # pragma: no cover - the conflicting row is committed by now
        raise ConflictError("a request with this Idempotency-Key is in progress; retry")
    return _replay(winner, fingerprint, idempotency_key)


async def _take_admission_lock(session: AsyncSession, user_id: uuid.UUID, wait: float) -> None:
    """The user's admission lock (service/budgets.py), held by the session's transaction until
    it ends; not granted within `wait` seconds: DBAPIError with LOCK_NOT_AVAILABLE."""
    connection = await session.connection()
    await connection.exec_driver_sql(
        ADMISSION_LOCK, (*admission_lock_keys(user_id), lock_timeout(wait))
    )


# As the hot path's count (hot_path._ACCEPT): no further than the budget (a user is refused
# at it, so it is all there is to count), on the partial index of open positions.
_COUNT_OPEN = text(
    "SELECT count(*) FROM (SELECT 1 FROM synthetic_positions"  # noqa: S608 - enum values only
    f" WHERE user_id = :user_id AND status IN ({OPEN_STATUSES_SQL}) LIMIT :limit) AS open"
)


async def _check_open_budget(session: AsyncSession, user: User, budgets: Budgets) -> None:
    """The user's positions not yet final, under the open-positions budget (429 otherwise),
    counted once the transaction holds the user's admission lock: the count sees every
    admission before it committed."""
    try:
        await _take_admission_lock(session, user.id, ADMISSION_WAIT_SECONDS)
    except DBAPIError as error:
        if getattr(error.orig, "sqlstate", None) == LOCK_NOT_AVAILABLE:
            raise crowded() from None
        raise
    open_count = await session.scalar(
        _COUNT_OPEN, {"user_id": user.id, "limit": budgets.open_positions}
    )
    if (open_count or 0) >= budgets.open_positions:
        raise budgets.open_positions_refused(open_count or 0)


_NOT_CLOSEABLE = {
    PositionStatus.PENDING: "it is still opening (PENDING): close it once it is ACTIVE or FAILED",
    PositionStatus.EXECUTING: "it is still opening (EXECUTING): close it once it is ACTIVE or "
    "FAILED",
    PositionStatus.CLOSING: "it is already closing (CLOSING)",
    PositionStatus.CLOSED: "it is already closed (CLOSED)",
    PositionStatus.CANCELLED: "it was cancelled before it opened (CANCELLED): it holds nothing",
}


@dataclass(frozen=True, slots=True)
class CloseRequested:
    position: SyntheticPosition
    started: bool  # False: the Idempotency-Key named an earlier close request


async def request_close(
    sessions: SessionScope,
    user: User,
    position_id: uuid.UUID,
    *,
    idempotency_key: str | None,
) -> CloseRequested:
    """ACTIVE, FAILED holding legs, or CLOSE_FAILED -> CLOSING (a new close round, its task
    sent by the caller). A repeat of an Idempotency-Key already used for this position's close
    starts nothing and answers with the position as it is. Anything else is a 409 that says
    why, and writes nothing."""
    for _ in range(2):
        async with sessions() as session:
            position = await get_position(session, user, position_id)
            if idempotency_key is not None:
                earlier = await repository.get_close_request(session, position.id, idempotency_key)
                if earlier is not None:
                    return CloseRequested(position, started=False)
            status = PositionStatus(position.status)
            if status in _NOT_CLOSEABLE:
                raise ConflictError(
                    f"position {position.id} cannot be closed: {_NOT_CLOSEABLE[status]}"
                )
            if status is PositionStatus.FAILED and not await _may_hold(session, position.id):
                raise ConflictError(
                    f"position {position.id} cannot be closed: it FAILED with nothing filled, "
                    "so it holds nothing"
                )

        async def note_key(session: AsyncSession) -> None:
            if idempotency_key is not None:
                await repository.add_close_request(session, position_id, idempotency_key)

        try:
            closing = await change_status(
                sessions,
                position_id,
                Transition(status, PositionStatus.CLOSING),
                with_writes=note_key,
            )
        except IntegrityError:
            # A concurrent request with the same key won: the next look replays it.
            continue
        if closing is not None:
            return CloseRequested(closing, started=True)
        # The status moved since it was read (a concurrent close): look again.
    raise ConflictError(f"position {position_id} is being closed by another request; retry")


async def _may_hold(session: AsyncSession, position_id: uuid.UUID) -> bool:
    """A fill is recorded, or an order was sent whose outcome may not be (the close looks it
    up before it plans anything)."""
    if await repository.get_trades(session, position_id):
        return True
    plan = await repository.get_plan(session, position_id)
    return any(leg.submitted_at is not None and leg.refused_at is None for leg in plan)


async def cancel_pending(
    sessions: SessionScope, position_id: uuid.UUID
) -> SyntheticPosition | None:
    """PENDING -> CANCELLED, one compare-and-set: against a worker's claim (PENDING ->
    EXECUTING, the same kind of statement) exactly one wins. None when the position was not
    PENDING any more. Nothing was sent for a PENDING position, so nothing is left held."""
    return await change_status(
        sessions, position_id, Transition(PositionStatus.PENDING, PositionStatus.CANCELLED)
    )


REVOCATION_LOCK_WAIT_SECONDS = 10.0


async def cancel_all_pending(sessions: SessionScope, user_id: uuid.UUID) -> list[uuid.UUID]:
    """Cancel each of the user's PENDING positions (what a stolen token may have queued), once
    their tokens are revoked; a position a worker claimed meanwhile is left to its run.

    Not covered: a request on the full path (not the one-statement hot path, which checks the
    token in its INSERT) that authenticated just before the revocation committed and reaches
    the admission lock after the last look (milliseconds). Running the command again cancels
    it (revoking nothing more)."""
    # Every admission that may have read a token before the revocation committed holds the
    # user's admission lock until its INSERT commits: once this has had its turn, those rows
    # are visible (and a later admission's INSERT finds the tokens revoked).
    async with sessions() as session:
        await _take_admission_lock(session, user_id, REVOCATION_LOCK_WAIT_SECONDS)
    cancelled: list[uuid.UUID] = []
    seen: set[uuid.UUID] = set()
    # Once more after a pass that found something: a full-path request that authenticated
    # just before the revocation and took its turn after this one may still commit one.
    while True:
        async with sessions() as session:
            pending = list(await users_repository.pending_positions(session, user_id))
        fresh = [p for p in pending if p not in seen]
        if not fresh:
            return cancelled
        seen.update(fresh)
        for position_id in fresh:
            if await cancel_pending(sessions, position_id) is not None:
                cancelled.append(position_id)


async def cancel_position(
    sessions: SessionScope, user: User, position_id: uuid.UUID
) -> SyntheticPosition:
    """The user's PENDING position, CANCELLED; a CANCELLED one as it is (a repeat); anything
    else, a 409 that says why, with nothing written."""
    async with sessions() as session:
        position = await get_position(session, user, position_id)
    if position.status == PositionStatus.PENDING:
        cancelled = await cancel_pending(sessions, position_id)
        if cancelled is not None:
            return cancelled
        # Claimed (or cancelled by another request) since it was read: look again.
        async with sessions() as session:
            position = await get_position(session, user, position_id)
    if position.status == PositionStatus.CANCELLED:
        return position
    raise ConflictError(
        f"position {position.id} cannot be cancelled: a worker has claimed it "
        f"({position.status}); only a PENDING position can be. Once it is ACTIVE or FAILED "
        f"holding legs, close it with POST /api/positions/{position.id}/close"
    )


async def get_position(
    session: AsyncSession, user: User, position_id: uuid.UUID
) -> SyntheticPosition:
    position = await repository.get_user_position(session, user.id, position_id)
    if position is None:
        # Another user's position is as absent as a missing one.
        raise NotFoundError(f"position {position_id} not found")
    return position


def etag(position: SyntheticPosition, market_version: int) -> str:
    """Changes whenever anything GET shows changes: every write of what it shows moves
    updated_at, and the mark prices it is valued at come with the market snapshot's
    version."""
    return etag_of(position.id, position.updated_at, position.attempts, market_version)


def etag_of(
    position_id: uuid.UUID, updated_at: datetime, attempts: int, market_version: int
) -> str:
    stamp = int(updated_at.timestamp() * 1_000_000)
    return f'"{position_id.hex}-{stamp}-{attempts}-{market_version}"'


async def _weights(
    session: AsyncSession, indices: IndexCache, codes: set[str]
) -> dict[str, dict[str, Decimal]]:
    found: dict[str, dict[str, Decimal]] = {}
    for code in codes:
        index = await indices.get(session, code)
        found[code] = {c.symbol: c.weight for c in index.components} if index else {}
    return found


async def load_detail(
    session: AsyncSession, position: SyntheticPosition, indices: IndexCache
) -> PositionDetail:
    close_plan = (
        list(await repository.get_close_plans_of(session, [position.id]))
        if position.close_round
        else []
    )
    weights = await _weights(session, indices, {position.index_code})
    return PositionDetail(
        position=position,
        components=list(await repository.get_components(session, position.id)),
        trades=list(await repository.get_trades(session, position.id)),
        issues=list(await reconciliation_rows.get_reconciliation_issues(session, position.id)),
        plan=list(await repository.get_plan(session, position.id)),
        close_plan=close_plan,
        weights=weights[position.index_code],
    )


def _encode_cursor(position: SyntheticPosition) -> str:
    raw = f"{position.created_at.isoformat()}|{position.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The (created_at, id) a cursor of ours carries; anything else, forged or damaged, is a
    422. Its time must name its offset (ours do) and lie within what the database takes once
    in UTC: year 1 at +14:00 parses but is out of range for the driver (a 500 before)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, _, position_id = raw.partition("|")
        at = datetime.fromisoformat(created)
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError("no offset")
        return at.astimezone(UTC), uuid.UUID(position_id)
    except (ValueError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise ValidationError("invalid cursor: pass next_cursor from the previous page") from None


async def list_positions(
    session: AsyncSession,
    user: User,
    *,
    limit: int,
    indices: IndexCache,
    status: PositionStatus | None = None,
    cursor: str | None = None,
) -> PositionPage:
    before = _decode_cursor(cursor) if cursor else None
    rows = list(
        await repository.list_user_positions(
            session, user.id, limit=limit + 1, status=status, before=before
        )
    )
    page, more = rows[:limit], len(rows) > limit
    ids = [p.id for p in page]
    components: dict[uuid.UUID, list[PositionComponent]] = defaultdict(list)
    trades: dict[uuid.UUID, list[Trade]] = defaultdict(list)
    plans: dict[uuid.UUID, list[PositionLeg]] = defaultdict(list)
    close_plans: dict[uuid.UUID, list[PositionCloseLeg]] = defaultdict(list)
    issues: dict[uuid.UUID, list[ReconciliationIssue]] = defaultdict(list)
    if ids:
        for component in await repository.get_components_of(session, ids):
            components[component.position_id].append(component)
        for trade in await repository.get_trades_of(session, ids):
            trades[trade.position_id].append(trade)
        for leg in await repository.get_plans_of(session, ids):
            plans[leg.position_id].append(leg)
        for issue in await reconciliation_rows.get_reconciliation_issues_of(session, ids):
            issues[issue.position_id].append(issue)
        closed = [p.id for p in page if p.close_round]
        for close_leg in await repository.get_close_plans_of(session, closed) if closed else []:
            close_plans[close_leg.position_id].append(close_leg)
    weights = await _weights(session, indices, {p.index_code for p in page})
    return PositionPage(
        items=[
            PositionDetail(
                p,
                components[p.id],
                trades[p.id],
                issues=issues[p.id],
                plan=plans[p.id],
                close_plan=close_plans[p.id],
                weights=weights[p.index_code],
            )
            for p in page
        ],
        next_cursor=_encode_cursor(page[-1]) if more and page else None,
    )
