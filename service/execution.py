"""The execution flow of one position, as plain async functions that take their dependencies.

A run holds the position's lock (serialising deliveries of one task), then its exchange
account's lock (one basket at a time per account, waited for in PostgreSQL's queue), then
claims the position (PENDING -> EXECUTING, or the claim holder resumes) -> plans once (stored
before the first order) -> each leg in order: leverage 1x, look the leg up if it may have been
sent, prove ownership (on the lock's own connection) and mark the leg submitted, place the
market order with its orderLinkId, read the outcome, record the fill at once
-> all filled: snapshot + ACTIVE in one transaction. A permanent error fails the position at
once; a transient one asks the caller (the Celery task) to run again after the next delay.
The run has one deadline: past it nothing more is sent, and the run winds down.

This module imports neither Celery nor FastAPI.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
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

from service.bybit.auth import ApiCredentials
from service.bybit.client import BybitClient
from service.bybit.errors import BybitError, BybitRateLimitError, DuplicateOrderLinkIdError
from service.bybit.types import Instrument, Order, OrderAck, WalletBalance
from service.credentials.service import load_decrypted
from service.db import SessionScope
from service.indices import repository as indices_repository
from service.market_data import MarketData, MarketDataUnavailableError
from service.metrics import LEG_LATENCY, POSITIONS_FINISHED, RETRIES
from service.models import PositionComponent, PositionLeg, PositionStatus, SyntheticPosition
from service.positions import repository
from service.security import CredentialCipher, CredentialDecryptionError
from service.trading_logic import (
    CompositionError,
    Direction,
    IndexComponent,
    calculate_trade_composition,
)

T = TypeVar("T")
logger = structlog.stdlib.get_logger("service.execution")


class RunLease(Protocol):
    """What a run holds while it lasts (service/run_lock.py): the position's lock, and
    through it the account's lock and the proof of ownership."""

    # The backend holding the position's lock: every status write of the run requires that
    # this backend still holds it, so a run that lost its lock cannot write.
    pid: int

    async def confirm(self, claim: str, *, submitting_leg: int | None = None) -> bool:
        """True when the run still holds the position's lock and its claim (then, with
        `submitting_leg`, that leg is marked submitted in the same round trip)."""
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
    # (account fingerprint, symbol) → when 1x was last confirmed in this process. Trusted for
    # `leverage_ttl_seconds`, so a change made by hand on the exchange is noticed soon.
    leverage_done: dict[tuple[str, str], float] = field(default_factory=dict)
    leverage_ttl_seconds: float = 300.0
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
    # One basket at a time per account: a new basket whose account is busy gives its worker
    # slot back and asks again after `account_retry_seconds` (or when the busy basket's next
    # attempt is due, at most `account_retry_max_seconds` later), for at most
    # `account_wait_limit_seconds` in all (settings ACCOUNT_*). A basket being resumed waits
    # up to `account_lock_wait_seconds` in line for the account's lock (only held briefly
    # by other baskets' checks): it goes first.
    account_retry_seconds: float = 1.0
    account_retry_max_seconds: float = 30.0
    account_wait_limit_seconds: float = 1800.0
    account_lock_wait_seconds: float = 2.0
    # An order is not started with less than this left before the run's deadline (the HTTP
    # read timeout and a margin): it could not be seen through.
    order_time_reserve: float = 11.0


class LegError(Exception):
    def __init__(self, reason: str, *, leg: int | None = None, label: str = "other") -> None:
        self.reason = reason
        self.leg = leg
        self.label = label  # a short cause for metrics: retcode_10016, http_502, fill_timeout
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
        async with lease.account(
            position.user_id, wait_seconds=deps.account_lock_wait_seconds if resuming else 0
        ) as account_locked:
            holder = None
            if account_locked and not resuming:
                # A basket of the account that has begun holds it until it is final, between
                # its retries too: a new basket's pre-flight must not count on its balance.
                async with deps.sessions() as session:
                    holder = await repository.account_holder(
                        session, position.user_id, other_than=position.id
                    )
            if not account_locked or holder is not None:
                return await _wait_for_account(deps, position, holder, task_id, lease, log)
            try:
                # Decrypted once per run, kept only in this run's memory; a rotation of the
                # encryption keys meanwhile changes the stored ciphertext, not the key itself.
                credentials = await _credentials(deps, position)
            except CredentialsUnreadableError as error:
                log.error("run.credentials_unreadable", error=str(error))
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
) -> RunResult:
    """Another basket of the same account has begun and not ended (`holder`), or holds the
    account's lock right now: give the worker slot back and ask again later, with no attempt
    used and the wait shown on the position. A new basket that has waited too long in all
    fails with nothing sent; a basket being resumed never fails for waiting."""
    async with deps.sessions() as session:
        since = await repository.mark_waiting_for_account(session, position.id)
    now = datetime.now(UTC)
    waited = (now - since).total_seconds() if since else 0.0
    if position.status == PositionStatus.PENDING and waited >= deps.account_wait_limit_seconds:
        reason = (
            f"waited {waited:.0f} s for the other baskets of the same exchange account to "
            f"finish (limit {deps.account_wait_limit_seconds:g} s); no order was sent"
        )
        claimed = await _claim(deps, position, task_id, lease, log)
        if isinstance(claimed, RunResult):
            return claimed
        await _fail(deps, position.id, task_id, reason, None, log, lease.pid)
        return RunResult(Outcome.FAILED, detail=reason)
    retry_in = deps.account_retry_seconds
    if holder is not None and holder.next_attempt_at is not None:
        # The busy basket sleeps until its next attempt: no use asking before.
        due = (holder.next_attempt_at - now).total_seconds()
        retry_in = min(max(due, retry_in), deps.account_retry_max_seconds)
    log.info(
        "position.waiting_for_account",
        busy_with=str(holder.id) if holder is not None else "the account's lock",
        waited_s=round(waited, 1),
        retry_in_s=round(retry_in, 1),
    )
    return RunResult(Outcome.RETRY, retry_in=retry_in, detail="waiting for the account")


async def _run_claimed(
    deps: ExecutionDeps, run: _Run, retries_done: int, log: structlog.stdlib.BoundLogger
) -> RunResult:
    position, task_id = run.position, run.claim
    deadline = asyncio.timeout_at(run.deadline)
    try:
        async with deadline:
            plan = await _ensure_plan(deps, position, log)
            recorded = await _recorded_links(deps, position.id)
            if not recorded and all(leg.submitted_at is None for leg in plan):
                await _preflight(deps, run.credentials, plan, log)
            for leg in plan:
                if leg.order_link_id in recorded:
                    continue
                await _execute_leg(deps, run, leg, log)
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
    if retries_done >= len(deps.retry_delays):
        reason = f"gave up after {retries_done + 1} attempts: {error.reason}"
        log.error("leg.failed", leg=error.leg, error=reason)
        await _fail(deps, position.id, task_id, reason, error.leg, log, run.lease.pid)
        return RunResult(Outcome.FAILED, detail=reason)
    delay = float(deps.retry_delays[retries_done])
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
        prices = await _call(deps, deps.market.prices, symbols)
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


async def _recorded_links(deps: ExecutionDeps, position_id: uuid.UUID) -> set[str]:
    async with deps.sessions() as session:
        return {t.order_link_id for t in await repository.get_trades(session, position_id)}


# ---- pre-flight: everything that can fail is checked before the first order ---------------


async def _preflight(
    deps: ExecutionDeps,
    credentials: ApiCredentials,
    plan: Sequence[PositionLeg],
    log: structlog.stdlib.BoundLogger,
) -> None:
    """No order is sent unless every instrument trades, every leg passes its filters at the
    current price, the account holds the basket at 1x plus a margin, and leverage is 1x on
    every symbol. A basket that fails half-way leaves the user holding part of an index, so
    whatever can be known before the first order is checked here."""
    symbols = [leg.symbol for leg in plan]
    # Filters, prices and the balance are independent reads: one round trip, not three.
    reads = await asyncio.gather(
        _call(deps, deps.market.instruments, symbols, fresh=True),
        _call(deps, deps.market.prices, symbols),
        _call(deps, deps.exchange.get_wallet_balance, credentials),
        return_exceptions=True,
    )
    for result in reads:
        if isinstance(result, MarketDataUnavailableError):
            raise _preflight_failure(log, f"market data: {result}", None) from None
        if isinstance(result, BybitError):
            raise _classify(result, None, "pre-flight market data and balance", log) from None
        if isinstance(result, BaseException):
            raise result
    instruments, prices, wallet = cast(
        tuple[dict[str, Instrument], dict[str, Decimal], WalletBalance], tuple(reads)
    )
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
    needed = (required * (1 + deps.preflight_margin)).quantize(Decimal("0.01"))
    if wallet.total_available_balance < needed:
        raise _preflight_failure(
            log,
            f"available balance {wallet.total_available_balance} USDT does not cover the "
            f"basket's {needed} USDT at 1x (notional {required.quantize(Decimal('0.01'))} "
            f"+ {deps.preflight_margin:%} for fees and slippage)",
            None,
        )
    # Leverage is per symbol: set on every symbol at once (each is cached once confirmed).
    outcomes = await asyncio.gather(
        *(_ensure_leverage(deps, credentials, leg, log) for leg in plan), return_exceptions=True
    )
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    log.info(
        "preflight.passed",
        required_usdt=str(needed),
        available_usdt=str(wallet.total_available_balance),
        symbols=symbols,
    )


def _preflight_failure(
    log: structlog.stdlib.BoundLogger, reason: str, leg: int | None
) -> PermanentLegError:
    log.error("preflight.failed", error=reason, leg=leg)
    return PermanentLegError(f"pre-flight: {reason}", leg=leg)


# ---- one leg ----------------------------------------------------------------------------


async def _execute_leg(
    deps: ExecutionDeps, run: _Run, leg: PositionLeg, run_log: structlog.stdlib.BoundLogger
) -> None:
    position, credentials = run.position, run.credentials
    log = run_log.bind(
        leg=leg.leg,
        symbol=leg.symbol,
        side=leg.side,
        qty=str(leg.quantity),
        order_link_id=leg.order_link_id,
    )
    await _ensure_leverage(deps, credentials, leg, log)
    started = time.perf_counter()
    order: Order | None = None
    if leg.submitted_at is not None:
        # A previous run may have sent it (and died, or lost the reply): look before placing.
        order = await _lookup(deps, credentials, leg)
        if order is not None:
            log.info("leg.found_existing", bybit_order_id=order.order_id)
    if order is None:
        await _prove_ownership(deps, run, leg)
        log.info("leg.submitted")
        await _place(deps, run, leg, log)
    order = await _await_outcome(deps, credentials, leg)
    latency_ms = round((time.perf_counter() - started) * 1000, 1)
    if order.cum_exec_qty <= 0:
        reason = f"order ended {order.order_status} with nothing filled"
        log.error("leg.failed", bybit_order_id=order.order_id, error=reason, latency_ms=latency_ms)
        LEG_LATENCY.labels("failed").observe(latency_ms / 1000)
        raise PermanentLegError(_leg_reason(leg, reason), leg=leg.leg)
    price = order.avg_price or await _average_price(deps, credentials, leg, order)
    partial = order.cum_exec_qty < leg.quantity
    async with deps.sessions() as session:
        await repository.record_trade(
            session,
            {
                "position_id": position.id,
                "leg": leg.leg,
                "symbol": leg.symbol,
                "side": leg.side,
                "bybit_order_id": order.order_id,
                "order_link_id": leg.order_link_id,
                "price": price,
                "quantity": order.cum_exec_qty,
                "fee": order.cum_exec_fee,
                "order_status": order.order_status,
                "executed_at": order.updated_at or datetime.now(UTC),
            },
        )
    LEG_LATENCY.labels("filled").observe(latency_ms / 1000)
    log.info(
        "leg.filled",
        bybit_order_id=order.order_id,
        price=str(price),
        filled_qty=str(order.cum_exec_qty),
        partial=partial,
        order_status=order.order_status,
        latency_ms=latency_ms,
    )


async def _prove_ownership(deps: ExecutionDeps, run: _Run, leg: PositionLeg) -> None:
    """Right before an order: enough time left to see it through, and proof, on the lock's
    own connection, that this run still holds the position (the same round trip marks the
    leg submitted, so a later run looks it up before placing anything)."""
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
    if not await run.lease.confirm(run.claim, submitting_leg=leg.leg):
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
    confirmed = deps.leverage_done.get((account, leg.symbol))
    if confirmed is not None and time.monotonic() - confirmed < deps.leverage_ttl_seconds:
        return
    try:
        changed = await _call(deps, deps.exchange.set_leverage, credentials, leg.symbol)
    except BybitError as error:
        raise _classify(error, leg, "set leverage 1x", log) from None
    deps.leverage_done[(account, leg.symbol)] = time.monotonic()
    log.info("leverage.set", leverage="1", changed=changed)


async def _place(
    deps: ExecutionDeps, run: _Run, leg: PositionLeg, log: structlog.stdlib.BoundLogger
) -> None:
    credentials = run.credentials
    sent = 0

    async def send() -> OrderAck:
        nonlocal sent
        sent += 1
        if sent > 1:
            # A re-send after a rate-limit refusal is an order too: prove ownership again.
            await _prove_ownership(deps, run, leg)
        return await deps.exchange.create_market_order(
            credentials,
            symbol=leg.symbol,
            side=leg.side,
            qty=leg.quantity,
            order_link_id=leg.order_link_id,
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
        if await _lookup(deps, credentials, leg) is None:
            # Absent now; it may still appear. The next run looks again before re-sending.
            raise TransientLegError(
                _leg_reason(leg, f"order outcome unknown: {error}"),
                leg=leg.leg,
                label="outcome_unknown",
            ) from None


async def _lookup(
    deps: ExecutionDeps, credentials: ApiCredentials, leg: PositionLeg
) -> Order | None:
    try:
        return await _call(
            deps,
            deps.exchange.get_order,
            credentials,
            symbol=leg.symbol,
            order_link_id=leg.order_link_id,
        )
    except BybitError as error:
        raise _classify(error, leg, "look up order") from None


async def _await_outcome(
    deps: ExecutionDeps, credentials: ApiCredentials, leg: PositionLeg
) -> Order:
    """Bybit acknowledges before it fills: poll the order until it is final."""
    deadline = time.monotonic() + deps.fill_timeout
    pause = 0.02
    while True:
        order = await _lookup(deps, credentials, leg)
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
    deps: ExecutionDeps, credentials: ApiCredentials, leg: PositionLeg, order: Order
) -> Decimal:
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
        await repository.add_components(
            session,
            [
                PositionComponent(
                    id=uuid.uuid4(),
                    position_id=position.id,
                    symbol=leg.symbol,
                    side=leg.side,
                    expected_quantity=leg.quantity,
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
        return TransientLegError(reason, leg=number, label=error.reason)
    if log is not None:
        log.error("leg.failed", error=str(error), retcode=error.retcode, action=action)
    return PermanentLegError(reason, leg=number)


def _leg_reason(leg: PositionLeg, reason: str) -> str:
    return f"leg {leg.leg} ({leg.side} {leg.quantity} {leg.symbol}): {reason}"
