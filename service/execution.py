"""The execution flow of one position, as plain async functions that take their dependencies.

A run holds the position's lock (serialising deliveries of one task), then its exchange
account's lock, under which it checks that no other basket of the account has begun and not
ended (one basket at a time per account: a new basket that finds one waits, and is sent again
when that one is final), then claims the position (PENDING -> EXECUTING, or the claim holder
resumes) -> plans once (stored before the first order) -> pre-flight (status, filters, balance,
position modes, held positions, leverage) -> each leg in order: look the leg up if it may have
been sent, prove ownership (on the lock's own connection) and mark the leg submitted, place
the market order with its orderLinkId, read the outcome, record the fill at once, and send
what a partial fill left (with orderLinkIds of its own) while it can be traded
-> snapshot of what filled + ACTIVE in one transaction. A permanent error fails the position
at once; a transient one asks the caller (the Celery task) to run again after the next delay
(a rate limit or an IP ban: when it ends, with no attempt used). The run has one deadline:
past it nothing more is sent, and the run winds down.

This module imports neither Celery nor FastAPI.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_FLOOR, Decimal
from enum import StrEnum
from typing import Protocol, TypeVar, cast

import structlog
from sqlalchemy.exc import SQLAlchemyError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from service.account_memo import AccountMemo, LocalAccountMemo
from service.bybit.auth import ApiCredentials
from service.bybit.client import BybitClient
from service.bybit.errors import (
    BybitError,
    BybitRateLimitError,
    DuplicateOrderLinkIdError,
    PermanentBybitError,
)
from service.bybit.types import Order, OrderAck, PositionInfo, WalletBalance
from service.credentials.service import load_decrypted
from service.db import SessionScope
from service.indices import repository as indices_repository
from service.market_data import MarketData, MarketDataUnavailableError
from service.metrics import LEG_LATENCY, POSITIONS_FINISHED, RETRIES
from service.models import (
    PositionComponent,
    PositionLeg,
    PositionStatus,
    SyntheticPosition,
    Trade,
)
from service.positions import repository
from service.queue import TaskPublisher
from service.security import CredentialCipher, CredentialDecryptionError
from service.trading_logic import (
    NOTIONAL_HEADROOM,
    CompositionError,
    Direction,
    IndexComponent,
    InstrumentFilters,
    calculate_trade_composition,
)

T = TypeVar("T")
logger = structlog.stdlib.get_logger("service.execution")
# Bybit's answer to set-leverage under portfolio margin ("not allowed to change leverage").
PORTFOLIO_MARGIN_LEVERAGE = 110038


class RunLease(Protocol):
    """What a run holds while it lasts (service/run_lock.py): the position's lock, and
    through it the account's lock and the proof of ownership."""

    # The backend holding the position's lock: every status write of the run requires that
    # this backend still holds it, so a run that lost its lock cannot write.
    pid: int

    async def confirm(
        self,
        claim: str,
        *,
        submitting_leg: int | None = None,
        submitting_remainder: int = 0,
    ) -> bool:
        """True when the run still holds the position's lock and its claim (then, with
        `submitting_leg`, that leg's order, the first or remainder number
        `submitting_remainder`, is marked submitted in the same round trip)."""
        ...

    def account(
        self, user_id: uuid.UUID, *, wait_seconds: float
    ) -> AbstractAsyncContextManager[bool]:
        """Hold the account's lock: at once, or waiting at most `wait_seconds`; yields False
        when it was not granted."""
        ...


# Opens the position's lock; yields None when another run holds it.
RunLock = Callable[[uuid.UUID], AbstractAsyncContextManager[RunLease | None]]


class Outcome(StrEnum):
    ACTIVE = "ACTIVE"
    FAILED = "FAILED"
    RETRY = "RETRY"
    DISCARDED = "DISCARDED"
    NOT_FOUND = "NOT_FOUND"
    # The run could not reach the database: nothing decided, the position is left to its
    # next attempt or the recovery sweep.
    ABORTED = "ABORTED"
    # A new basket whose account is busy with another: marked waiting, sent again when that
    # one is final (or by the recovery sweep).
    WAITING = "WAITING"


@dataclass(frozen=True, slots=True)
class RunResult:
    outcome: Outcome
    retry_in: float | None = None
    detail: str | None = None


@dataclass
class ExecutionDeps:
    sessions: SessionScope
    run_lock: RunLock
    exchange: BybitClient
    market: MarketData
    cipher: CredentialCipher
    retry_delays: Sequence[float]
    # What is known of each (account, symbol): leverage at 1x, position mode (shared by the
    # workers in Redis).
    memo: AccountMemo = field(default_factory=LocalAccountMemo)
    # How old the market data a basket is planned and checked with may be (the shared
    # snapshot is rewritten every MARKET_REFRESH_SECONDS).
    market_max_age_seconds: float = 30.0
    call_attempts: int = 3
    call_wait_max: float = 1.0
    # A rate-limited call waits for Bybit's reset time, if that is this close, and tries again.
    rate_limit_wait_max: float = 2.0
    rate_limit_attempts: int = 6
    fill_timeout: float = 10.0
    # How early a scheduled retry may start (clock skew between hosts).
    early_tolerance_seconds: float = 2.0
    # Pre-flight: the available balance must cover the basket at 1x plus this share.
    preflight_margin: Decimal = Decimal("0.01")
    # One basket at a time per account: a new basket whose account is busy is marked waiting
    # and gives its worker slot back; the basket holding the account sends the one that has
    # waited longest when it is final (through `publisher`), the recovery sweep any it
    # missed. A new basket that has waited `account_wait_limit_seconds` in all fails. A basket
    # being resumed waits up to `account_lock_wait_seconds` in line for the account's lock
    # (other baskets hold it only for their check), then asks again after
    # `account_retry_seconds`: it goes first.
    publisher: TaskPublisher | None = None
    account_retry_seconds: float = 1.0
    account_wait_limit_seconds: float = 1800.0
    account_lock_wait_seconds: float = 2.0
    # An order is not started with less than this left before the run's deadline (the HTTP
    # read timeout and a margin): it could not be seen through.
    order_time_reserve: float = 11.0
    # A leg that filled only in part gets at most this many more orders for its remainder.
    remainder_attempts: int = 3
    # How long an order that may have landed is looked for before it counts as absent.
    visibility_wait_seconds: float = 3.0
    # How long after its creation a position may wait out rate limits and IP bans without
    # using attempts (after that they count like any transient error).
    pause_budget_seconds: float = 7200.0
    # A new basket whose stored key this worker cannot decrypt is left for another worker
    # (a key rotation rolling out) this long, then fails with nothing sent.
    unreadable_key_grace_seconds: float = 600.0


class LegError(Exception):
    def __init__(
        self,
        reason: str,
        *,
        leg: int | None = None,
        label: str = "other",
        retry_after: float | None = None,
        pause: bool = False,
    ) -> None:
        self.reason = reason
        self.leg = leg
        self.label = label  # a short cause for metrics: retcode_10016, http_502, fill_timeout
        # The exchange said when to come back (an IP ban): no attempt is scheduled before.
        self.retry_after = retry_after
        # A rate limit or an IP ban, not a fault of the basket: the run waits it out without
        # using an attempt.
        self.pause = pause
        super().__init__(reason)


class PermanentLegError(LegError):
    """The position fails now: no further orders, nothing reversed."""


class TransientLegError(LegError):
    """The run stops; the position is tried again after the next delay."""


class OwnershipLostError(Exception):
    """The run can no longer prove it holds the position: it stops without another write."""


class CredentialsUnreadableError(Exception):
    """The stored key cannot be decrypted here (a worker without the right CREDENTIALS_KEYS,
    say): not the position's fault, so nothing about it is decided."""


def order_link_id(position_id: uuid.UUID, leg: int) -> str:
    """Deterministic per position and leg: 32 hex + '-' + leg, at most 36 characters."""
    return f"{position_id.hex}-{leg}"


@dataclass(frozen=True, slots=True)
class _Run:
    """One run of a claimed position: what every step of it needs."""

    position: SyntheticPosition
    claim: str
    credentials: ApiCredentials
    lease: RunLease
    deadline: float | None  # event-loop time; None: no deadline (tests awaiting directly)


# ---- entry point --------------------------------------------------------------------------


async def execute_position(
    deps: ExecutionDeps, position_id: uuid.UUID, *, task_id: str, deadline: float | None = None
) -> RunResult:
    """Run (or resume) one position. Every run counts as an attempt, a crashed one too, so
    `TRADE_RETRY_DELAYS` bounds the number of runs whatever happens to the messages; waiting
    for the account does not count. `deadline` is the event-loop time past which nothing more
    is sent."""
    structlog.contextvars.bind_contextvars(position_id=str(position_id), task_id=task_id)
    log = logger.bind()
    try:
        return await _execute(deps, position_id, task_id, deadline, log)
    except (SQLAlchemyError, OSError) as error:
        # asyncpg's statement timeout is a bare TimeoutError: say what it means.
        detail = (
            "the database did not answer within DB_STATEMENT_TIMEOUT_SECONDS"
            if isinstance(error, TimeoutError)
            else f"{type(error).__name__}: {error}"
        )
        log.error("run.database_unavailable", error=detail)
        return RunResult(Outcome.ABORTED, detail=detail)


async def _execute(
    deps: ExecutionDeps,
    position_id: uuid.UUID,
    task_id: str,
    deadline: float | None,
    log: structlog.stdlib.BoundLogger,
) -> RunResult:
    async with deps.run_lock(position_id) as lease:
        if lease is None:
            log.warning("position.discarded", reason="another run holds the position")
            return RunResult(Outcome.DISCARDED, detail="locked")
        position = await _eligible(deps, position_id, task_id, log)
        if isinstance(position, RunResult):
            return position
        resuming = position.status == PositionStatus.EXECUTING
        result: RunResult | None = None
        holder: SyntheticPosition | None = None
        waiting_since: datetime | None = None
        for look in (1, 2):
            async with lease.account(
                position.user_id, wait_seconds=deps.account_lock_wait_seconds if resuming else 0
            ) as account_locked:
                holder = None
                if account_locked and not resuming:
                    # A basket of the account that has begun holds it until it is final,
                    # between its retries too: a new basket's pre-flight must not count on
                    # its balance.
                    async with deps.sessions() as session:
                        holder = await repository.account_holder(
                            session, position.user_id, other_than=position.id
                        )
                if account_locked and holder is None:
                    result = await _run_holding_account(
                        deps, position, task_id, lease, deadline, log
                    )
                    break
            if resuming or look == 2:
                return await _wait_for_account(
                    deps, position, holder, task_id, lease, log, since=waiting_since
                )
            # Marked waiting before one more look: a holder that ended this instant looked for
            # waiting baskets before this one was marked, and would not have sent it.
            async with deps.sessions() as session:
                waiting_since = await repository.mark_waiting_for_account(session, position.id)
        assert result is not None
        if result.outcome in (Outcome.ACTIVE, Outcome.FAILED):
            # The account is free: its next basket need not wait for the recovery sweep.
            await _hand_off(deps, position.user_id, log)
        return result


async def _run_holding_account(
    deps: ExecutionDeps,
    position: SyntheticPosition,
    task_id: str,
    lease: RunLease,
    deadline: float | None,
    log: structlog.stdlib.BoundLogger,
) -> RunResult:
    try:
        # Decrypted once per run, kept only in this run's memory; a rotation of the
        # encryption keys meanwhile changes the stored ciphertext, not the key itself.
        credentials = await _credentials(deps, position)
    except CredentialsUnreadableError as error:
        log.error("run.credentials_unreadable", error=str(error))
        age = (datetime.now(UTC) - position.created_at).total_seconds()
        if position.status == PositionStatus.PENDING and age > deps.unreadable_key_grace_seconds:
            # Not a worker missing a key for a moment (a rotation rolling out): the stored key
            # is unreadable. Nothing was sent; the user must store it again.
            reason = (
                f"the stored API key cannot be decrypted ({error}); store it again with "
                "PUT /api/credentials. No order was sent"
            )
            claimed = await _claim(deps, position, task_id, lease, log)
            if isinstance(claimed, RunResult):
                return claimed
            await _fail(deps, position.id, task_id, reason, None, log, lease.pid)
            return RunResult(Outcome.FAILED, detail=reason)
        return RunResult(Outcome.ABORTED, detail=str(error))
    except PermanentLegError as error:
        claimed = await _claim(deps, position, task_id, lease, log)
        if isinstance(claimed, RunResult):
            return claimed
        await _fail(deps, position.id, task_id, error.reason, None, log, lease.pid)
        return RunResult(Outcome.FAILED, detail=error.reason)
    claimed = await _claim(deps, position, task_id, lease, log)
    if isinstance(claimed, RunResult):
        return claimed
    structlog.contextvars.bind_contextvars(attempt=claimed.attempts)
    run = _Run(claimed, task_id, credentials, lease, deadline)
    return await _run_claimed(deps, run, claimed.attempts - 1, log)


async def _hand_off(
    deps: ExecutionDeps, user_id: uuid.UUID, log: structlog.stdlib.BoundLogger
) -> None:
    """Send the account's basket that has waited longest (if any): its turn has come."""
    if deps.publisher is None:
        return
    async with deps.sessions() as session:
        waiting = await repository.next_waiting(session, user_id)
    if waiting is None:
        return
    try:
        await deps.publisher.publish(waiting)
    except Exception as error:  # the broker's errors are many; the sweep sends it anyway
        log.warning("account.hand_off_failed", next_position_id=str(waiting), error=str(error))
        return
    log.info("account.handed_off", next_position_id=str(waiting))


async def _eligible(
    deps: ExecutionDeps, position_id: uuid.UUID, task_id: str, log: structlog.stdlib.BoundLogger
) -> SyntheticPosition | RunResult:
    """May this task run the position? PENDING, or EXECUTING under this task's claim with its
    retry due. Only read: the claim is written once the account is held."""
    async with deps.sessions() as session:
        current = await repository.get_position(session, position_id)
    if current is None:
        log.warning("position.not_found")
        return RunResult(Outcome.NOT_FOUND)
    if current.status == PositionStatus.PENDING:
        return current
    if current.status != PositionStatus.EXECUTING or current.claim != task_id:
        log.info("position.discarded", status=current.status, reason="not this task's claim")
        return RunResult(Outcome.DISCARDED, detail=current.status)
    if current.next_attempt_at is not None:
        remaining = (current.next_attempt_at - datetime.now(UTC)).total_seconds()
        if remaining > deps.early_tolerance_seconds:
            # A stray copy (e.g. redelivered) arrived before the scheduled retry is due.
            log.info("position.discarded", reason="retry not yet due", due_in_s=remaining)
            return RunResult(Outcome.DISCARDED, detail="early")
    return current


async def _claim(
    deps: ExecutionDeps,
    position: SyntheticPosition,
    task_id: str,
    lease: RunLease,
    log: structlog.stdlib.BoundLogger,
) -> SyntheticPosition | RunResult:
    async with deps.sessions() as session:
        if position.status == PositionStatus.PENDING:
            claimed = await repository.compare_and_set_status(
                session,
                position.id,
                expected=PositionStatus.PENDING,
                new=PositionStatus.EXECUTING,
                claim=task_id,
                lock_pid=lease.pid,
            )
            if claimed is not None:
                log.info(
                    "position.status_changed",
                    from_status=PositionStatus.PENDING,
                    to_status=PositionStatus.EXECUTING,
                )
                return claimed
        else:
            resumed = await repository.resume_claimed(
                session, position.id, task_id, lock_pid=lease.pid
            )
            if resumed is not None:
                log.info("position.resumed", attempts=resumed.attempts)
                return resumed
    log.info("position.discarded", reason="the claim changed before this run could take it")
    return RunResult(Outcome.DISCARDED, detail="claim lost")


async def _wait_for_account(
    deps: ExecutionDeps,
    position: SyntheticPosition,
    holder: SyntheticPosition | None,
    task_id: str,
    lease: RunLease,
    log: structlog.stdlib.BoundLogger,
    *,
    since: datetime | None = None,
) -> RunResult:
    """Another basket of the same account has begun and not ended (`holder`), or holds the
    account's lock this instant. A new basket is marked waiting and gives its worker slot
    back, with no attempt used and nothing polling: the holder sends it when it is final (the
    recovery sweep, if that send is lost). One that has waited too long in all fails with
    nothing sent. A basket being resumed goes first: it asks again shortly, and never fails
    for waiting. `since`: when the wait began, if the caller marked it already."""
    if since is None:
        async with deps.sessions() as session:
            since = await repository.mark_waiting_for_account(session, position.id)
    waited = (datetime.now(UTC) - since).total_seconds() if since else 0.0
    busy_with = str(holder.id) if holder is not None else "the account's lock"
    if position.status == PositionStatus.EXECUTING:
        log.info(
            "position.waiting_for_account",
            busy_with=busy_with,
            waited_s=round(waited, 1),
            retry_in_s=deps.account_retry_seconds,
        )
        return RunResult(
            Outcome.RETRY, retry_in=deps.account_retry_seconds, detail="waiting for the account"
        )
    if waited >= deps.account_wait_limit_seconds:
        reason = (
            f"waited {waited:.0f} s for the other baskets of the same exchange account to "
            f"finish (limit {deps.account_wait_limit_seconds:g} s); no order was sent"
        )
        claimed = await _claim(deps, position, task_id, lease, log)
        if isinstance(claimed, RunResult):
            return claimed
        await _fail(deps, position.id, task_id, reason, None, log, lease.pid)
        return RunResult(Outcome.FAILED, detail=reason)
    log.info("position.waiting_for_account", busy_with=busy_with, waited_s=round(waited, 1))
    return RunResult(Outcome.WAITING, detail="waiting for the account")


async def _run_claimed(
    deps: ExecutionDeps, run: _Run, retries_done: int, log: structlog.stdlib.BoundLogger
) -> RunResult:
    position, task_id = run.position, run.claim
    deadline = asyncio.timeout_at(run.deadline)
    try:
        async with deadline:
            plan = await _ensure_plan(deps, position, log)
            recorded = await _recorded_trades(deps, position.id)
            if not recorded and all(leg.submitted_at is None for leg in plan):
                await _preflight(deps, run, plan, log)
            for leg in plan:
                await _execute_leg(deps, run, leg, [t for t in recorded if t.leg == leg.leg], log)
            await _finish(deps, run, plan, log)
            return RunResult(Outcome.ACTIVE)
    except TimeoutError:
        if not deadline.expired():
            raise
        # Cancelled where it was: an order in flight was sent before the deadline and is
        # looked up by the next run; nothing is sent after it.
        log.warning("run.deadline_passed")
        error = TransientLegError("the run's deadline passed before it finished", label="deadline")
        return await _retry_later(deps, run, retries_done, error, log)
    except OwnershipLostError as error:
        log.error("position.ownership_lost", error=str(error))
        return RunResult(Outcome.DISCARDED, detail="ownership lost")
    except PermanentLegError as error:
        await _fail(deps, position.id, task_id, error.reason, error.leg, log, run.lease.pid)
        return RunResult(Outcome.FAILED, detail=error.reason)
    except TransientLegError as error:
        return await _retry_later(deps, run, retries_done, error, log)


async def _retry_later(
    deps: ExecutionDeps,
    run: _Run,
    retries_done: int,
    error: TransientLegError,
    log: structlog.stdlib.BoundLogger,
) -> RunResult:
    position, task_id = run.position, run.claim
    if error.pause and error.retry_after is not None:
        age = (datetime.now(UTC) - position.created_at).total_seconds()
        if age < deps.pause_budget_seconds:
            # Waiting out a limit or a ban is not an attempt: come back when it ends.
            async with deps.sessions() as session:
                due = await repository.set_next_attempt(
                    session,
                    position.id,
                    task_id,
                    error.retry_after,
                    lock_pid=run.lease.pid,
                    refund_attempt=True,
                )
            RETRIES.labels(error.label).inc()
            log.warning(
                "leg.retry_scheduled",
                leg=error.leg,
                error=error.reason,
                retry_in_s=error.retry_after,
                attempt_used=False,
                next_attempt_at=due.isoformat() if due else None,
            )
            return RunResult(Outcome.RETRY, retry_in=error.retry_after, detail=error.reason)
    if retries_done >= len(deps.retry_delays):
        reason = f"gave up after {retries_done + 1} attempts: {error.reason}"
        log.error("leg.failed", leg=error.leg, error=reason)
        await _fail(deps, position.id, task_id, reason, error.leg, log, run.lease.pid)
        return RunResult(Outcome.FAILED, detail=reason)
    # Never before the exchange said (an IP ban lasts ten minutes or more).
    delay = max(float(deps.retry_delays[retries_done]), error.retry_after or 0.0)
    RETRIES.labels(error.label).inc()
    async with deps.sessions() as session:
        due = await repository.set_next_attempt(
            session, position.id, task_id, delay, lock_pid=run.lease.pid
        )
    log.warning(
        "leg.retry_scheduled",
        leg=error.leg,
        error=error.reason,
        retry_in_s=delay,
        next_attempt_at=due.isoformat() if due else None,
    )
    return RunResult(Outcome.RETRY, retry_in=delay, detail=error.reason)


# ---- plan -------------------------------------------------------------------------------


async def _ensure_plan(
    deps: ExecutionDeps, position: SyntheticPosition, log: structlog.stdlib.BoundLogger
) -> Sequence[PositionLeg]:
    async with deps.sessions() as session:
        stored = await repository.get_plan(session, position.id)
        if stored:
            return stored
        index = await indices_repository.get_index(session, position.index_code)
        if index is None:
            raise PermanentLegError(f"index {position.index_code} no longer exists")
        components = [IndexComponent(symbol=c.symbol, weight=c.weight) for c in index.components]
    symbols = [c.symbol for c in components]
    try:
        instruments = await _call(deps, deps.market.instruments, symbols)
        prices = await _call(deps, deps.market.prices, symbols, max_age=deps.market_max_age_seconds)
        legs = calculate_trade_composition(
            components, position.size, Direction(position.direction), instruments, prices
        )
    except CompositionError as error:
        raise PermanentLegError(f"cannot plan the basket: {error}") from None
    except MarketDataUnavailableError as error:
        raise PermanentLegError(f"cannot plan the basket: {error}") from None
    except BybitError as error:
        raise _classify(error, None, "market data") from None
    rows = [
        PositionLeg(
            position_id=position.id,
            leg=leg.leg,
            symbol=leg.symbol,
            side=leg.side.value,
            quantity=leg.quantity,
            reference_price=leg.reference_price,
            order_link_id=order_link_id(position.id, leg.leg),
        )
        for leg in legs
    ]
    async with deps.sessions() as session:
        await repository.add_plan(session, rows)
    log.info(
        "position.planned",
        legs=[
            {"leg": r.leg, "symbol": r.symbol, "side": r.side, "qty": str(r.quantity)} for r in rows
        ],
    )
    return rows


async def _recorded_trades(deps: ExecutionDeps, position_id: uuid.UUID) -> list[Trade]:
    async with deps.sessions() as session:
        return list(await repository.get_trades(session, position_id))


# ---- pre-flight: everything that can fail is checked before the first order ---------------


async def _preflight(
    deps: ExecutionDeps,
    run: _Run,
    plan: Sequence[PositionLeg],
    log: structlog.stdlib.BoundLogger,
) -> None:
    """No order is sent unless every instrument trades, every leg passes its filters at the
    current price, the account holds the basket at 1x plus a margin, no position the user
    already holds would be netted or re-margined by the basket, and leverage is 1x on every
    symbol. A basket that fails half-way leaves the user holding part of an index, so whatever
    can be known before the first order is checked here, in as few exchange calls as can be,
    side by side: every trading instrument's status and filters (one request), prices from
    the shared snapshot, the balance, and the open positions (and, when the account holds
    none, one symbol's row for the position mode)."""
    credentials = run.credentials
    symbols = [leg.symbol for leg in plan]
    fresh = deps.market_max_age_seconds
    reads = await asyncio.gather(
        # The status now (a halt must be seen before the first order), in one request.
        _call(deps, deps.market.current, symbols),
        _call(deps, deps.market.prices, symbols, max_age=fresh),
        _call(deps, deps.exchange.get_wallet_balance, credentials),
        _call(deps, deps.exchange.get_positions, credentials),
        return_exceptions=True,
    )
    for result in reads:
        if isinstance(result, MarketDataUnavailableError):
            raise _preflight_failure(log, f"market data: {result}", None) from None
        if isinstance(result, BybitError):
            raise _classify(result, None, "pre-flight reads", log) from None
        if isinstance(result, BaseException):
            raise result
    instruments, prices, wallet, held = cast(
        tuple[
            dict[str, InstrumentFilters],
            dict[str, Decimal],
            WalletBalance,
            list[PositionInfo],
        ],
        tuple(reads),
    )
    required = _check_filters(plan, instruments, prices, log)
    needed = (required * (1 + deps.preflight_margin)).quantize(Decimal("0.01"))
    if wallet.total_available_balance < needed:
        margin_mode = " (isolated margin: the USDT balance not held by positions)"
        raise _preflight_failure(
            log,
            f"available balance {wallet.total_available_balance} USDT"
            f"{margin_mode if wallet.isolated else ''} does not cover the basket's {needed} "
            f"USDT at 1x (notional {required.quantize(Decimal('0.01'))} + "
            f"{deps.preflight_margin:%} for fees and slippage)",
            None,
        )
    hedge = await _position_modes(deps, credentials, symbols, held, log)
    _check_held_positions(plan, held, hedge, log)
    for row in held:
        if row.leverage == 1:
            await deps.memo.confirm_leverage(credentials.account, row.symbol)
    outcomes = await asyncio.gather(
        *(_ensure_leverage(deps, credentials, leg, log) for leg in plan), return_exceptions=True
    )
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    for leg in plan:
        leg.position_idx = position_idx_for(leg.side, hedge=hedge[leg.symbol])
    async with deps.sessions() as session:
        await repository.set_position_idx(
            session, run.position.id, {leg.leg: leg.position_idx for leg in plan}
        )
    log.info(
        "preflight.passed",
        required_usdt=str(needed),
        available_usdt=str(wallet.total_available_balance),
        hedge_mode=sorted(symbol for symbol, on in hedge.items() if on),
        isolated_margin=wallet.isolated,
        symbols=symbols,
    )


def position_idx_for(side: str, *, hedge: bool) -> int:
    """Bybit's positionIdx for an order that opens `side`: 0 in one-way mode; in hedge mode
    1 for the buy side, 2 for the sell side."""
    if not hedge:
        return 0
    return 1 if side == "Buy" else 2


async def _position_modes(
    deps: ExecutionDeps,
    credentials: ApiCredentials,
    symbols: Sequence[str],
    held: Sequence[PositionInfo],
    log: structlog.stdlib.BoundLogger,
) -> dict[str, bool]:
    """Each symbol's position mode (True: hedge). Bybit sets it per symbol (a switch per coin
    skips symbols with positions or orders), so mixed modes are normal: read from the open
    positions' rows, the memo, and for the rest one row per symbol, side by side."""
    account = credentials.account
    modes = {row.symbol: row.hedge_mode for row in held if row.symbol in symbols}
    for symbol in symbols:
        if symbol not in modes:
            known = await deps.memo.hedge_mode(account, symbol)
            if known is not None:
                modes[symbol] = known
    unknown = [s for s in symbols if s not in modes]
    if unknown:
        try:
            rows = await asyncio.gather(
                *(_call(deps, deps.exchange.get_positions, credentials, symbol=s) for s in unknown)
            )
        except BybitError as error:
            raise _classify(error, None, "read the position modes", log) from None
        for symbol, symbol_rows in zip(unknown, rows, strict=True):
            modes[symbol] = any(row.hedge_mode for row in symbol_rows)
            for row in symbol_rows:
                if row.leverage == 1:
                    await deps.memo.confirm_leverage(account, symbol)
    for symbol in symbols:
        await deps.memo.remember_hedge_mode(account, symbol, modes[symbol])
    return modes


def _check_filters(
    plan: Sequence[PositionLeg],
    instruments: Mapping[str, InstrumentFilters],
    prices: Mapping[str, Decimal],
    log: structlog.stdlib.BoundLogger,
) -> Decimal:
    """Every leg against its instrument at the current price; returns the basket's notional."""
    required = Decimal(0)
    for leg in plan:
        rules, price = instruments[leg.symbol], prices[leg.symbol]
        notional = leg.quantity * price
        required += notional
        problem = None
        if rules.status != "Trading":
            problem = f"{leg.symbol} is not trading (status {rules.status})"
        elif not rules.min_order_qty <= leg.quantity <= rules.max_mkt_order_qty:
            problem = (
                f"quantity {leg.quantity} is outside [{rules.min_order_qty}, "
                f"{rules.max_mkt_order_qty}]"
            )
        elif notional < rules.min_notional_value:
            problem = (
                f"notional {notional.normalize():f} USDT at the current price {price} is below "
                f"minNotionalValue {rules.min_notional_value}"
            )
        if problem:
            raise _preflight_failure(log, _leg_reason(leg, problem), leg.leg)
    return required


def _check_held_positions(
    plan: Sequence[PositionLeg],
    held: Sequence[PositionInfo],
    hedge: Mapping[str, bool],
    log: structlog.stdlib.BoundLogger,
) -> None:
    """A position the user already holds on a basket symbol must come through untouched: in
    one-way mode an order of the other side would net it (reduce or flip it, not open the
    basket's leg); and setting 1x would change the margin of one held at other leverage."""
    legs = {leg.symbol: leg for leg in plan}
    for row in held:
        leg = legs.get(row.symbol)
        if leg is None or row.size <= 0:
            continue
        if not hedge[row.symbol] and row.side and row.side != leg.side:
            raise _preflight_failure(
                log,
                _leg_reason(
                    leg,
                    f"you hold a {row.side} position of {row.size} {row.symbol}; in one-way "
                    f"mode this basket's {leg.side} order would reduce it instead of opening "
                    "its own. Close it first, or switch the account to hedge mode (Bybit: "
                    "position mode, per settle coin), where both sides are held apart",
                ),
                leg.leg,
            )
        if row.leverage is not None and row.leverage != 1:
            raise _preflight_failure(
                log,
                _leg_reason(
                    leg,
                    f"you hold a {row.side} position of {row.size} {row.symbol} at "
                    f"{row.leverage.normalize():f}x; the basket trades at 1x, and setting 1x "
                    "would change that position's margin. Set it to 1x or close it first",
                ),
                leg.leg,
            )


def _preflight_failure(
    log: structlog.stdlib.BoundLogger, reason: str, leg: int | None
) -> PermanentLegError:
    log.error("preflight.failed", error=reason, leg=leg)
    return PermanentLegError(f"pre-flight: {reason}", leg=leg)


# ---- one leg ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _LegOrder:
    """One order of a leg: the first (`remainder` 0), or one for a partial fill's remainder."""

    leg: PositionLeg
    remainder: int
    link: str
    qty: Decimal

    @property
    def may_have_been_sent(self) -> bool:
        if self.remainder == 0:
            return self.leg.submitted_at is not None
        return self.remainder <= self.leg.remainders_submitted


async def _execute_leg(
    deps: ExecutionDeps,
    run: _Run,
    leg: PositionLeg,
    recorded: Sequence[Trade],
    run_log: structlog.stdlib.BoundLogger,
) -> None:
    """The leg's first order, then, while it falls short of the plan and the rest can be
    traded, up to `remainder_attempts` more for the remainder. A market order is an IOC within
    a price band: on a thin book it fills only in part, and the rest is cancelled."""
    log = run_log.bind(leg=leg.leg, symbol=leg.symbol, side=leg.side)
    links = {t.order_link_id for t in recorded}
    filled = sum((t.quantity for t in recorded), Decimal(0))
    if leg.order_link_id not in links:
        await _ensure_leverage(deps, run.credentials, leg, log)
        first = _LegOrder(leg, 0, leg.order_link_id, leg.quantity)
        order = await _send_and_record(deps, run, first, log)
        assert order is not None  # a refusal of the first order raises
        if order.cum_exec_qty <= 0:
            reason = f"order ended {order.order_status} with nothing filled"
            log.error(
                "leg.failed",
                qty=str(leg.quantity),
                order_link_id=leg.order_link_id,
                bybit_order_id=order.order_id,
                error=reason,
            )
            raise PermanentLegError(_leg_reason(leg, reason), leg=leg.leg)
        filled += order.cum_exec_qty
    for remainder in range(1, deps.remainder_attempts + 1):
        if filled >= leg.quantity:
            return
        link = remainder_link_id(run.position.id, leg.leg, remainder)
        if link in links:
            continue  # recorded by an earlier run: already counted in `filled`
        if remainder <= leg.remainders_submitted:
            # An earlier run may have sent it: what it filled counts, whatever the book or
            # the price are now.
            sent = _LegOrder(leg, remainder, link, leg.quantity - filled)
            found = await _lookup_patiently(deps, run.credentials, sent)
            if found is not None:
                log.info("leg.found_existing", order_link_id=link, bybit_order_id=found.order_id)
                order = await _record_outcome(deps, run, sent, log, time.perf_counter())
                filled += order.cum_exec_qty
                continue
        qty = await _tradeable_remainder(deps, leg, leg.quantity - filled)
        if qty is None:
            break
        placed = await _send_and_record(
            deps, run, _LegOrder(leg, remainder, link, qty), log, refusal_ends_leg=True
        )
        if placed is None:
            break  # refused, nothing placed: the rest is the leg's shortfall
        filled += placed.cum_exec_qty
    if filled < leg.quantity:
        log.warning(
            "leg.shortfall",
            planned_qty=str(leg.quantity),
            filled_qty=str(filled),
            shortfall_qty=str(leg.quantity - filled),
        )


def remainder_link_id(position_id: uuid.UUID, leg: int, remainder: int) -> str:
    """Deterministic per position, leg and remainder order, within Bybit's 36 characters:
    28 hex of the position (112 bits) + '-' + leg + '-r' + the remainder's number."""
    return f"{position_id.hex[:28]}-{leg}-r{remainder}"


async def _tradeable_remainder(
    deps: ExecutionDeps, leg: PositionLeg, remainder: Decimal
) -> Decimal | None:
    """The remainder as an order the exchange accepts now (a multiple of qtyStep, at least
    minOrderQty and minNotionalValue at the current price), or None: it is the shortfall."""
    try:
        instruments = await _call(deps, deps.market.instruments, [leg.symbol])
        prices = await _call(
            deps, deps.market.prices, [leg.symbol], max_age=deps.market_max_age_seconds
        )
    except MarketDataUnavailableError:
        return None
    except BybitError as error:
        raise _classify(error, leg, "market data for the remainder") from None
    rules, price = instruments[leg.symbol], prices[leg.symbol]
    steps = (remainder / rules.qty_step).to_integral_value(rounding=ROUND_FLOOR)
    qty = (steps * rules.qty_step).quantize(rules.qty_step)
    # The price is a few seconds old and may have moved against the leg (that is what thinned
    # the book): keep the same headroom above the minimum as planning does.
    floor = rules.min_notional_value * (1 + NOTIONAL_HEADROOM)
    if qty <= 0 or qty < rules.min_order_qty or qty * price < floor:
        return None
    return min(qty, rules.max_mkt_order_qty)


async def _send_and_record(
    deps: ExecutionDeps,
    run: _Run,
    leg_order: _LegOrder,
    run_log: structlog.stdlib.BoundLogger,
    *,
    refusal_ends_leg: bool = False,
) -> Order | None:
    """Place one order of a leg (looked up first if it may have been sent), wait until it is
    final, and record its fill at once. `refusal_ends_leg` (remainder orders): a refusal that
    placed nothing (110094 after the price moved, say) ends the leg's tries (None) instead of
    failing the basket."""
    credentials = run.credentials
    log = run_log.bind(
        qty=str(leg_order.qty), order_link_id=leg_order.link, remainder=leg_order.remainder
    )
    started = time.perf_counter()
    order: Order | None = None
    if leg_order.may_have_been_sent:
        # A previous run may have sent it (and died, or lost the reply): look before placing.
        order = await _lookup(deps, credentials, leg_order)
        if order is not None:
            log.info("leg.found_existing", bybit_order_id=order.order_id)
    if order is None:
        await _prove_ownership(deps, run, leg_order)
        log.info("leg.submitted")
        try:
            await _place(deps, run, leg_order, log)
        except PermanentLegError as error:
            if not refusal_ends_leg:
                raise
            log.warning("leg.remainder_refused", error=error.reason)
            return None
    return await _record_outcome(deps, run, leg_order, log, started)


async def _record_outcome(
    deps: ExecutionDeps,
    run: _Run,
    leg_order: _LegOrder,
    log: structlog.stdlib.BoundLogger,
    started: float,
) -> Order:
    """Wait until the order is final and record its fill."""
    credentials = run.credentials
    order = await _await_outcome(deps, credentials, leg_order)
    latency_ms = round((time.perf_counter() - started) * 1000, 1)
    if order.cum_exec_qty <= 0:
        LEG_LATENCY.labels("failed").observe(latency_ms / 1000)
        log.warning(
            "leg.nothing_filled",
            bybit_order_id=order.order_id,
            order_status=order.order_status,
            latency_ms=latency_ms,
        )
        return order
    price = order.avg_price or await _average_price(deps, credentials, leg_order, order)
    async with deps.sessions() as session:
        await repository.record_trade(
            session, trade_values(run.position.id, leg_order, order, price)
        )
    LEG_LATENCY.labels("filled").observe(latency_ms / 1000)
    log.info(
        "leg.filled",
        bybit_order_id=order.order_id,
        price=str(price),
        filled_qty=str(order.cum_exec_qty),
        partial=order.cum_exec_qty < leg_order.qty,
        order_status=order.order_status,
        fee=str(order.cum_exec_fee) if order.cum_exec_fee is not None else None,
        fee_coin=order.fee_coin,
        latency_ms=latency_ms,
    )
    return order


def trade_values(
    position_id: uuid.UUID, leg_order: _LegOrder | PositionLeg, order: Order, price: Decimal
) -> dict[str, object]:
    """The `trades` row of one filled order."""
    leg = leg_order.leg if isinstance(leg_order, _LegOrder) else leg_order
    return {
        "position_id": position_id,
        "leg": leg.leg,
        "symbol": leg.symbol,
        "side": leg.side,
        "bybit_order_id": order.order_id,
        "order_link_id": order.order_link_id,
        "price": price,
        "quantity": order.cum_exec_qty,
        "fee": order.cum_exec_fee,
        "fee_coin": order.fee_coin,
        "fee_detail": (
            {coin: format(amount, "f") for coin, amount in order.fee_detail.items()}
            if order.fee_detail
            else None
        ),
        "order_status": order.order_status,
        "executed_at": order.updated_at or datetime.now(UTC),
    }


async def _prove_ownership(deps: ExecutionDeps, run: _Run, leg_order: _LegOrder) -> None:
    """Right before an order: enough time left to see it through, and proof, on the lock's
    own connection, that this run still holds the position (the same round trip marks the
    order submitted, so a later run looks it up before placing anything)."""
    leg = leg_order.leg
    if run.deadline is not None:
        left = run.deadline - asyncio.get_running_loop().time()
        if left < deps.order_time_reserve:
            raise TransientLegError(
                _leg_reason(
                    leg,
                    f"only {max(left, 0):.1f} s left before the run's deadline, less than an "
                    f"order may take ({deps.order_time_reserve:g} s); left for the next attempt",
                ),
                leg=leg.leg,
                label="deadline",
            )
    if not await run.lease.confirm(
        run.claim, submitting_leg=leg.leg, submitting_remainder=leg_order.remainder
    ):
        raise OwnershipLostError(
            _leg_reason(
                leg,
                "the run could not prove it still holds the position (its lock connection "
                "was lost, or the claim changed); nothing was sent",
            )
        )


async def _credentials(deps: ExecutionDeps, position: SyntheticPosition) -> ApiCredentials:
    try:
        async with deps.sessions() as session:
            credentials = await load_decrypted(session, deps.cipher, position.user_id)
    except CredentialDecryptionError as error:
        raise CredentialsUnreadableError(str(error)) from None
    if credentials is None:
        raise PermanentLegError("the user has no Bybit credentials stored")
    return credentials


async def _ensure_leverage(
    deps: ExecutionDeps,
    credentials: ApiCredentials,
    leg: PositionLeg,
    log: structlog.stdlib.BoundLogger,
) -> None:
    account = credentials.account
    if await deps.memo.leverage_confirmed(account, leg.symbol):
        return
    try:
        changed = await _call(deps, deps.exchange.set_leverage, credentials, leg.symbol)
    except BybitError as error:
        if error.retcode == PORTFOLIO_MARGIN_LEVERAGE:
            # Portfolio margin has no leverage per symbol: the balance check is the 1x.
            await deps.memo.confirm_leverage(account, leg.symbol)
            log.info("leverage.not_applicable", symbol=leg.symbol, reason="portfolio margin")
            return
        raise _classify(error, leg, "set leverage 1x", log) from None
    await deps.memo.confirm_leverage(account, leg.symbol)
    log.info("leverage.set", symbol=leg.symbol, leverage="1", changed=changed)


async def _place(
    deps: ExecutionDeps, run: _Run, leg_order: _LegOrder, log: structlog.stdlib.BoundLogger
) -> None:
    leg, credentials = leg_order.leg, run.credentials
    sent = 0
    flipped = False

    async def send() -> OrderAck:
        nonlocal sent, flipped
        sent += 1
        if sent > 1:
            # A re-send after a rate-limit refusal is an order too: prove ownership again.
            await _prove_ownership(deps, run, leg_order)
        try:
            return await deps.exchange.create_market_order(
                credentials,
                symbol=leg.symbol,
                side=leg.side,
                qty=leg_order.qty,
                order_link_id=leg_order.link,
                position_idx=leg.position_idx,
            )
        except PermanentBybitError as error:
            if flipped or not _wrong_position_idx(error):
                raise
        # The symbol's position mode changed since it was read (it placed nothing): the other
        # mode's index, once, and remember it.
        flipped = True
        hedge = leg.position_idx == 0
        leg.position_idx = position_idx_for(leg.side, hedge=hedge)
        await deps.memo.remember_hedge_mode(credentials.account, leg.symbol, hedge)
        log.warning("leg.position_mode_changed", hedge_mode=hedge)
        await _prove_ownership(deps, run, leg_order)
        return await deps.exchange.create_market_order(
            credentials,
            symbol=leg.symbol,
            side=leg.side,
            qty=leg_order.qty,
            order_link_id=leg_order.link,
            position_idx=leg.position_idx,
        )

    try:
        # Only a refusal that certainly placed nothing (the rate limit) is re-sent here;
        # every other failure goes through the lookup or the next run.
        ack = await _call(
            deps, send, _retry_if=_rate_limited(deps), _attempts=deps.rate_limit_attempts
        )
        log.info("leg.accepted", bybit_order_id=ack.order_id)
    except DuplicateOrderLinkIdError:
        # The first attempt landed: read it, never count it as a failure.
        log.warning("leg.duplicate_order_link_id")
    except BybitError as error:
        if not error.ambiguous:
            raise _classify(error, leg, "place order", log) from None
        log.warning("leg.outcome_unknown", error=str(error))
        if not error.transient:
            # A retCode Bybit does not document: the order may have landed and not be listed
            # yet. Look for it for a while; only if it never shows does the leg fail with it.
            if await _lookup_patiently(deps, credentials, leg_order) is None:
                raise _classify(error, leg, "place order", log) from None
            return
        if await _lookup(deps, credentials, leg_order) is None:
            # Absent now; it may still appear. The next run looks again before re-sending.
            raise TransientLegError(
                _leg_reason(leg, f"order outcome unknown: {error}"),
                leg=leg.leg,
                label="outcome_unknown",
            ) from None


def _wrong_position_idx(error: BybitError) -> bool:
    return error.retcode == 10001 and "position idx" in error.message.lower()


async def _lookup(
    deps: ExecutionDeps, credentials: ApiCredentials, leg_order: _LegOrder
) -> Order | None:
    try:
        return await _call(
            deps,
            deps.exchange.get_order,
            credentials,
            symbol=leg_order.leg.symbol,
            order_link_id=leg_order.link,
        )
    except BybitError as error:
        raise _classify(error, leg_order.leg, "look up order") from None


async def _lookup_patiently(
    deps: ExecutionDeps, credentials: ApiCredentials, leg_order: _LegOrder
) -> Order | None:
    """Look the order up until it shows or `visibility_wait_seconds` have passed: Bybit
    lists an accepted order a moment after it answers."""
    deadline = time.monotonic() + deps.visibility_wait_seconds
    pause = 0.05
    while True:
        order = await _lookup(deps, credentials, leg_order)
        if order is not None or time.monotonic() >= deadline:
            return order
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.5)


async def _await_outcome(
    deps: ExecutionDeps, credentials: ApiCredentials, leg_order: _LegOrder
) -> Order:
    """Bybit acknowledges before it fills, and lists the order a moment later: poll it until
    it is final."""
    leg = leg_order.leg
    deadline = time.monotonic() + deps.fill_timeout
    pause = 0.02
    while True:
        order = await _lookup(deps, credentials, leg_order)
        if order is not None and order.is_final:
            return order
        if time.monotonic() >= deadline:
            state = order.order_status if order else "not visible"
            raise TransientLegError(
                _leg_reason(leg, f"order not final after {deps.fill_timeout}s ({state})"),
                leg=leg.leg,
                label="fill_timeout",
            )
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.5)


async def _average_price(
    deps: ExecutionDeps, credentials: ApiCredentials, leg_order: _LegOrder, order: Order
) -> Decimal:
    leg = leg_order.leg
    try:
        executions = await _call(
            deps,
            deps.exchange.get_executions,
            credentials,
            symbol=leg.symbol,
            order_id=order.order_id,
        )
    except BybitError as error:
        raise _classify(error, leg, "read executions") from None
    quantity = sum((e.exec_qty for e in executions), Decimal(0))
    if quantity <= 0:
        raise TransientLegError(
            _leg_reason(leg, "fills not visible yet"), leg=leg.leg, label="fills_not_visible"
        )
    return sum((e.exec_price * e.exec_qty for e in executions), Decimal(0)) / quantity


# ---- finish -----------------------------------------------------------------------------


async def _finish(
    deps: ExecutionDeps,
    run: _Run,
    plan: Sequence[PositionLeg],
    log: structlog.stdlib.BoundLogger,
) -> None:
    position = run.position
    async with deps.sessions() as session:
        filled: dict[int, Decimal] = {leg.leg: Decimal(0) for leg in plan}
        for trade in await repository.get_trades(session, position.id):
            filled[trade.leg] += trade.quantity
        # The snapshot is what the position holds: what filled, not what was planned.
        await repository.add_components(
            session,
            [
                PositionComponent(
                    id=uuid.uuid4(),
                    position_id=position.id,
                    symbol=leg.symbol,
                    side=leg.side,
                    expected_quantity=filled[leg.leg],
                )
                for leg in plan
            ],
        )
        done = await repository.compare_and_set_status(
            session,
            position.id,
            expected=PositionStatus.EXECUTING,
            new=PositionStatus.ACTIVE,
            require_claim=run.claim,
            lock_pid=run.lease.pid,
        )
        if done is None:
            # This run lost the position (its lock, or the state changed): the snapshot
            # rolls back with the scope, and the one that holds it decides.
            raise OwnershipLostError("the position was not this run's to finish any more")
    POSITIONS_FINISHED.labels(PositionStatus.ACTIVE.value).inc()
    log.info(
        "position.status_changed",
        from_status=PositionStatus.EXECUTING,
        to_status=PositionStatus.ACTIVE,
    )
    short = [leg for leg in plan if filled[leg.leg] < leg.quantity]
    if short:
        # Held, but not all of the basket: the book was too thin for some legs.
        log.warning(
            "position.partial",
            legs=[
                {
                    "leg": leg.leg,
                    "symbol": leg.symbol,
                    "planned_qty": str(leg.quantity),
                    "filled_qty": str(filled[leg.leg]),
                    "shortfall_qty": str(leg.quantity - filled[leg.leg]),
                }
                for leg in short
            ],
        )


async def _fail(
    deps: ExecutionDeps,
    position_id: uuid.UUID,
    task_id: str,
    reason: str,
    leg: int | None,
    log: structlog.stdlib.BoundLogger,
    lock_pid: int,
) -> None:
    async with deps.sessions() as session:
        failed = await repository.compare_and_set_status(
            session,
            position_id,
            expected=PositionStatus.EXECUTING,
            new=PositionStatus.FAILED,
            require_claim=task_id,
            lock_pid=lock_pid,
            error=reason,
            failed_leg=leg,
        )
    if failed is not None:
        POSITIONS_FINISHED.labels(PositionStatus.FAILED.value).inc()
        log.error(
            "position.status_changed",
            from_status=PositionStatus.EXECUTING,
            to_status=PositionStatus.FAILED,
            error=reason,
            leg=leg,
        )


# ---- exchange calls: short in-task retries of transient errors -----------------------------


def _briefly_retryable(deps: ExecutionDeps) -> Callable[[BaseException], bool]:
    """Reads and idempotent writes: any transient error, unless it asks for a long wait."""

    def predicate(error: BaseException) -> bool:
        if not isinstance(error, BybitError) or not error.transient:
            return False
        # A long back-off (the IP limit) is the Celery schedule's job, not tenacity's.
        return error.retry_after is None or error.retry_after <= deps.rate_limit_wait_max

    return predicate


def _rate_limited(deps: ExecutionDeps) -> Callable[[BaseException], bool]:
    """Order creation: only a rate-limit refusal, which certainly placed nothing."""

    def predicate(error: BaseException) -> bool:
        return (
            isinstance(error, BybitRateLimitError)
            and error.retcode is not None
            and error.retry_after is not None
            and error.retry_after <= deps.rate_limit_wait_max
        )

    return predicate


def _log_call_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    logger.info("exchange.call_retry", attempt_number=state.attempt_number, error=str(error))


def _wait_for(deps: ExecutionDeps) -> Callable[[RetryCallState], float]:
    backoff = wait_exponential(multiplier=0.1, max=deps.call_wait_max)

    def wait(state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        delay = backoff(state)
        if isinstance(error, BybitError) and error.retry_after is not None:
            # Bybit says when the limit resets: wait that long (plus a little), not less.
            delay = max(delay, min(error.retry_after + 0.05, deps.rate_limit_wait_max))
        return delay

    return wait


async def _call(
    deps: ExecutionDeps,
    fn: Callable[..., Awaitable[T]],
    *args: object,
    _retry_if: Callable[[BaseException], bool] | None = None,
    _attempts: int | None = None,
    **kwargs: object,
) -> T:
    """An exchange call with short in-task retries (tenacity) of the errors `_retry_if`
    accepts: by default any transient one, for reads and idempotent writes."""
    retrying = AsyncRetrying(
        retry=retry_if_exception(_retry_if or _briefly_retryable(deps)),
        stop=stop_after_attempt(_attempts or deps.call_attempts),
        wait=_wait_for(deps),
        before_sleep=_log_call_retry,
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await fn(*args, **kwargs)
    raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover


def _classify(
    error: BybitError,
    leg: PositionLeg | None,
    action: str,
    log: structlog.stdlib.BoundLogger | None = None,
) -> LegError:
    reason = f"{action} failed: {error}"
    if leg is not None:
        reason = _leg_reason(leg, reason)
    number = leg.leg if leg is not None else None
    if error.transient:
        return TransientLegError(
            reason,
            leg=number,
            label=error.reason,
            retry_after=error.retry_after,
            pause=isinstance(error, BybitRateLimitError),
        )
    if log is not None:
        log.error("leg.failed", error=str(error), retcode=error.retcode, action=action)
    return PermanentLegError(reason, leg=number)


def _leg_reason(leg: PositionLeg, reason: str) -> str:
    return f"leg {leg.leg} ({leg.side} {leg.quantity} {leg.symbol}): {reason}"
