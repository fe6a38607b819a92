"""What a run depends on (passed in, never imported: the Celery task and the tests build
them), and what one run of a claimed position carries through its steps."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

from service.account_memo import AccountMemo, LocalAccountMemo
from service.bybit.auth import ApiCredentials
from service.bybit.client import BybitClient
from service.config import Settings
from service.db import SessionScope
from service.indices.cache import IndexCache
from service.market.data import MarketData
from service.models import SyntheticPosition
from service.queue import TaskPublisher
from service.security import CredentialOpener, opener_from_settings


class RunLease(Protocol):
    """What a run holds while it lasts (service/execution/run_lock.py): the position's lock, and
    through it the account's lock and the proof of ownership."""

    # The backend holding the position's lock: every status write of the run requires that
    # this backend still holds it, so a run that lost its lock cannot write.
    pid: int

    async def confirm(
        self,
        claim: str,
        *,
        submitting_legs: Sequence[int] = (),
        submitting_remainder: int = 0,
        close_round: int | None = None,
        facts: PreflightFacts | None = None,
    ) -> bool:
        """True when the run still holds the position's lock and its claim (then the orders
        of `submitting_legs`, the first or remainder number `submitting_remainder`, are
        marked submitted in the same round trip, and the opening's `facts` written).
        `close_round`: the run is that close round's (CLOSING, its legs in
        position_close_legs); None: the opening's (EXECUTING, position_legs)."""
        ...

    async def fetch(self, query: str, *args: object) -> list[Any]:
        """The rows of one statement (asyncpg's $n parameters) on the lock's connection,
        committed on its own: the run's hot statements (service/positions/run_statements.py)."""
        ...

    def account(
        self, user_id: uuid.UUID, *, wait_seconds: float
    ) -> AbstractAsyncContextManager[bool]:
        """Hold the account's lock: at once, or waiting at most `wait_seconds`; yields False
        when it was not granted."""
        ...


# Opens the position's lock; yields None when another run holds it.
RunLock = Callable[[uuid.UUID], AbstractAsyncContextManager[RunLease | None]]


def _setting(name: str) -> Any:
    """A knob's default is its setting's (service/config.py): one definition of each."""
    return field(default=Settings.model_fields[name].default)


@dataclass
class ExecutionDeps:
    """What a run is given. The knobs default to their settings' defaults (documented in the
    README); the worker passes the configured values (workers/runtime.py)."""

    sessions: SessionScope
    run_lock: RunLock
    exchange: BybitClient
    market: MarketData
    # Opens the stored keys (the worker's private keys, and legacy CREDENTIALS_KEYS).
    cipher: CredentialOpener
    retry_delays: Sequence[float]
    # What is known of each (account, symbol): leverage at 1x, position mode (shared by the
    # workers in Redis).
    memo: AccountMemo = field(default_factory=LocalAccountMemo)
    # The basket holding an account sends the one that has waited longest when it is final.
    publisher: TaskPublisher | None = None
    # The index catalogue, read from the database at most every 30 s (it changes with a
    # deploy): a new basket's plan does not wait on it.
    indices: IndexCache = field(default_factory=IndexCache)
    # How old the market data a basket is planned and checked with may be: two refreshes'
    # worth of the shared snapshot (one late refresh does not send every basket to the
    # exchange for its market data).
    market_max_age_seconds: float = 2 * Settings.model_fields["market_refresh_seconds"].default
    # An order is not started with less than this left before the run's deadline (the HTTP
    # read timeout and a margin): it could not be seen through.
    order_time_reserve: float = Settings.model_fields["http_read_timeout_seconds"].default + 1
    preflight_margin: Decimal = _setting("preflight_margin")
    account_retry_seconds: float = _setting("account_retry_seconds")
    account_wait_limit_seconds: float = _setting("account_wait_limit_seconds")
    account_lock_wait_seconds: float = _setting("account_lock_wait_seconds")
    fill_timeout: float = _setting("order_fill_timeout_seconds")
    visibility_wait_seconds: float = _setting("order_visibility_wait_seconds")
    remainder_attempts: int = _setting("remainder_orders")
    batch_max_orders: int = _setting("batch_max_orders")
    call_attempts: int = _setting("exchange_call_attempts")
    call_wait_max: float = _setting("exchange_call_wait_max_seconds")
    rate_limit_wait_max: float = _setting("rate_limit_wait_max_seconds")
    rate_limit_attempts: int = _setting("rate_limit_attempts")
    pause_budget_seconds: float = _setting("pause_budget_seconds")
    unreadable_key_grace_seconds: float = _setting("unreadable_key_grace_seconds")
    early_tolerance_seconds: float = _setting("retry_early_tolerance_seconds")

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        sessions: SessionScope,
        run_lock: RunLock,
        exchange: BybitClient,
        market: MarketData,
        memo: AccountMemo,
        publisher: TaskPublisher | None,
    ) -> ExecutionDeps:
        return cls(
            sessions=sessions,
            run_lock=run_lock,
            exchange=exchange,
            market=market,
            memo=memo,
            publisher=publisher,
            # Raises CredentialsKeyError: a worker that cannot open any key refuses to run.
            cipher=opener_from_settings(settings),
            retry_delays=settings.trade_retry_delays,
            market_max_age_seconds=2 * settings.market_refresh_seconds,
            order_time_reserve=settings.http_read_timeout_seconds + 1,
            preflight_margin=settings.preflight_margin,
            account_retry_seconds=settings.account_retry_seconds,
            account_wait_limit_seconds=settings.account_wait_limit_seconds,
            account_lock_wait_seconds=settings.account_lock_wait_seconds,
            fill_timeout=settings.order_fill_timeout_seconds,
            visibility_wait_seconds=settings.order_visibility_wait_seconds,
            remainder_attempts=settings.remainder_orders,
            batch_max_orders=settings.batch_max_orders,
            call_attempts=settings.exchange_call_attempts,
            call_wait_max=settings.exchange_call_wait_max_seconds,
            rate_limit_wait_max=settings.rate_limit_wait_max_seconds,
            rate_limit_attempts=settings.rate_limit_attempts,
            pause_budget_seconds=settings.pause_budget_seconds,
            unreadable_key_grace_seconds=settings.unreadable_key_grace_seconds,
            early_tolerance_seconds=settings.retry_early_tolerance_seconds,
        )


@dataclass(slots=True)
class PreflightFacts:
    """What a new basket's pre-flight found, to be stored: the key's Bybit account (None:
    nothing to write) and the positionIdx of the legs whose symbols are in hedge mode, by
    leg. Written in the round trip of the run's next ownership proof, with the marks of the
    first orders it sends (before any order: a later run that sends one again uses them)."""

    exchange_uid: str | None = None
    position_idx: dict[int, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.exchange_uid is not None or bool(self.position_idx)

    def clear(self) -> None:
        self.exchange_uid = None
        self.position_idx = {}


@dataclass(frozen=True, slots=True)
class Run:
    """One run of a claimed position: what every step of it needs."""

    position: SyntheticPosition
    claim: str
    credentials: ApiCredentials
    lease: RunLease
    deadline: float | None  # event-loop time; None: no deadline (tests awaiting directly)
    # Runs of this position before this one (its retries so far).
    retries_done: int = 0
    # The close round this run closes; None for the opening.
    close_round: int | None = None
    # Symbols whose leverage this run has seen at 1x (its pre-flight): not asked again per leg.
    leverage_checked: set[str] = field(default_factory=set)
    # Claimed from PENDING by this run: a new basket, with no plan and nothing sent yet.
    fresh: bool = False
    # Its pre-flight's findings not yet written (see PreflightFacts).
    facts: PreflightFacts = field(default_factory=PreflightFacts)

    async def prove(
        self,
        *,
        submitting_legs: Sequence[int] = (),
        submitting_remainder: int = 0,
    ) -> bool:
        """The run's ownership proof (`RunLease.confirm`) before an order: its lock and its
        claim, the orders it marks submitted, and the pre-flight's facts not yet written."""
        facts = self.facts if self.close_round is None and self.facts else None
        proven = await self.lease.confirm(
            self.claim,
            submitting_legs=submitting_legs,
            submitting_remainder=submitting_remainder,
            close_round=self.close_round,
            facts=facts,
        )
        if proven and facts is not None:
            facts.clear()
        return proven
