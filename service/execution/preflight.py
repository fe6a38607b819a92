"""Pre-flight: everything that can fail is checked before the first order, in as few
exchange calls as can be. A basket that fails half-way leaves the user holding part of an
index, so whatever can be known before the first order is known here."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import cast

import structlog

from service.bybit.auth import ApiCredentials
from service.bybit.errors import BybitError
from service.bybit.types import Instrument, PositionInfo, WalletBalance
from service.execution import calls
from service.execution.deps import ExecutionDeps, Run
from service.execution.outcomes import PermanentRunError, RunError, leg_message
from service.market.data import MarketDataUnavailableError
from service.models import PositionLeg
from service.trading_logic import InstrumentFilters, order_filter_violation

# Bybit's answer to set-leverage under portfolio margin ("not allowed to change leverage").
PORTFOLIO_MARGIN_LEVERAGE = 110038


# What the pre-flight reads from the exchange and the market data, side by side: each
# result, or the exception that read raised.
AccountReads = tuple[
    dict[str, Instrument] | BaseException,
    dict[str, Decimal] | BaseException,
    WalletBalance | BaseException,
    list[PositionInfo] | BaseException,
    str | BaseException,
    "_Remembered | BaseException",
]


@dataclass(frozen=True, slots=True)
class _Remembered:
    """What the account memo knows of the basket's symbols."""

    hedge_modes: dict[str, bool]
    at_1x: set[str]


async def read_account(
    deps: ExecutionDeps, credentials: ApiCredentials, symbols: Sequence[str]
) -> AccountReads:
    """The pre-flight's reads, side by side: every trading instrument's status and filters
    (one request), prices from the shared snapshot, the balance, the open positions, the
    key's account (remembered once read) and what the memo knows of the symbols' position
    modes and leverage."""
    fresh = deps.market_max_age_seconds
    return await asyncio.gather(
        # The status now (a halt must be seen before the first order), in one request.
        calls.call(deps, deps.market.current, symbols),
        calls.call(deps, deps.market.prices, symbols, max_age=fresh),
        calls.call(deps, deps.exchange.get_wallet_balance, credentials),
        calls.call(deps, deps.exchange.get_positions, credentials),
        _exchange_uid(deps, credentials),
        _remembered(deps, credentials.account, symbols),
        return_exceptions=True,
    )


async def _remembered(deps: ExecutionDeps, account: str, symbols: Sequence[str]) -> _Remembered:
    modes, at_1x = await asyncio.gather(
        deps.memo.hedge_modes(account, symbols), deps.memo.leverage_confirmed(account, symbols)
    )
    return _Remembered(modes, at_1x)


async def _exchange_uid(deps: ExecutionDeps, credentials: ApiCredentials) -> str:
    """The key's account: remembered (it never changes for a key), or read once."""
    known = await deps.memo.exchange_uid(credentials.account)
    if known is not None:
        return known
    uid = await calls.call(deps, deps.exchange.get_account_uid, credentials)
    await deps.memo.remember_exchange_uid(credentials.account, uid)
    return uid


@dataclass
class EarlyReads:
    """The pre-flight's reads for `symbols`, sent ahead (`start_reads`)."""

    symbols: frozenset[str]
    task: asyncio.Task[AccountReads]

    async def cancel(self) -> None:
        """Nothing of the reads is left running (the run ended before its pre-flight)."""
        if not self.task.done():
            self.task.cancel()
        await asyncio.wait([self.task])


def start_reads(
    deps: ExecutionDeps, credentials: ApiCredentials, symbols: Sequence[str]
) -> EarlyReads:
    """The pre-flight's reads sent now: they need only the key and the symbols, so a new
    basket's run sends them as soon as its symbols are known (from the catalogue in memory:
    before its claim is written), and their round trip covers the claim and the computing and
    storing of its plan. Sent by a run holding the account (its lock, and no other basket of
    it begun and not ended), as the pre-flight's own would be."""
    reads = read_account(deps, credentials, symbols)
    return EarlyReads(frozenset(symbols), asyncio.ensure_future(reads))


async def preflight(
    deps: ExecutionDeps,
    run: Run,
    plan: Sequence[PositionLeg],
    log: structlog.stdlib.BoundLogger,
    *,
    early: EarlyReads | None = None,
) -> None:
    """No order is sent unless every instrument trades, every leg passes its filters at the
    current price, the account holds the basket at 1x plus a margin, no position the user
    already holds would be netted or re-margined by the basket, and leverage is 1x on every
    symbol. A basket that fails half-way leaves the user holding part of an index, so whatever
    can be known before the first order is checked here, in as few exchange calls as can be,
    side by side: every trading instrument's status and filters (one request), prices from
    the shared snapshot, the balance, the open positions (and, when the account holds
    none, one symbol's row for the position mode), and the account's UID (a close is sent
    only with a key of the same account). `early`: those reads, sent ahead by this run."""
    credentials = run.credentials
    symbols = [leg.symbol for leg in plan]
    if early is not None and early.symbols.issuperset(symbols):
        reads = await early.task
    else:
        reads = await read_account(deps, credentials, symbols)
    *reads_needed, uid_read, remembered = reads
    if isinstance(remembered, BaseException):
        raise remembered
    uid: str | None = None
    if isinstance(uid_read, BybitError) and not uid_read.transient:
        # Bybit's Demo Trading does not serve query-api: the basket goes on, and a close
        # cannot check the account its key trades. (A transient failure is the run's, as
        # for every other read: the basket is tried again, and the account read with it.)
        log.warning("preflight.account_unknown", error=str(uid_read))
    elif isinstance(uid_read, BybitError):
        raise _refused(log, calls.classify(uid_read, None, "pre-flight reads")) from None
    elif isinstance(uid_read, BaseException):
        raise uid_read
    else:
        uid = uid_read
    for result in reads_needed:
        if isinstance(result, MarketDataUnavailableError):
            raise _preflight_failure(log, f"market data: {result}", None) from None
        if isinstance(result, BybitError):
            raise _refused(log, calls.classify(result, None, "pre-flight reads")) from None
        if isinstance(result, BaseException):
            raise result
    instruments, prices, wallet, held = cast(
        tuple[
            dict[str, InstrumentFilters],
            dict[str, Decimal],
            WalletBalance,
            list[PositionInfo],
        ],
        tuple(reads_needed),
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
    hedge, seen_at_1x = await _position_modes(
        deps, credentials, symbols, held, remembered.hedge_modes, log
    )
    _check_held_positions(plan, held, hedge, log)
    at_1x = {row.symbol for row in held if row.leverage == 1} | seen_at_1x
    confirmed = at_1x | remembered.at_1x
    outcomes = await asyncio.gather(
        *(
            ensure_leverage(deps, credentials, leg, log, confirmed=confirmed)
            for leg in plan
            if leg.symbol not in confirmed
        ),
        return_exceptions=True,
    )
    for outcome in outcomes:
        if isinstance(outcome, RunError):
            raise _refused(log, outcome)
        if isinstance(outcome, BaseException):
            raise outcome
    run.leverage_checked.update(symbols)
    # Only what differs from the stored plan is written (one-way mode: nothing).
    changed = {
        leg.leg: index
        for leg in plan
        if (index := position_idx_for(leg.side, hedge=hedge[leg.symbol])) != leg.position_idx
    }
    for leg in plan:
        leg.position_idx = changed.get(leg.leg, leg.position_idx)
    # Stored with the first orders' marks, in the round trip of their proof.
    if uid is not None and run.position.exchange_uid is None:
        run.facts.exchange_uid = uid
    run.facts.position_idx = changed
    # Kept for every worker (and their time to live renewed).
    await calls.all_of(
        [
            deps.memo.confirm_leverage(credentials.account, sorted(at_1x)),
            deps.memo.remember_hedge_modes(credentials.account, {s: hedge[s] for s in symbols}),
        ]
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
    remembered: Mapping[str, bool],
    log: structlog.stdlib.BoundLogger,
) -> tuple[dict[str, bool], set[str]]:
    """Each symbol's position mode (True: hedge), and the symbols the rows read here showed
    at 1x. Bybit sets the mode per symbol (a switch per coin skips symbols with positions or
    orders), so mixed modes are normal: read from the open positions' rows, the memo
    (`remembered`), and for the rest one row per symbol, side by side."""
    modes = {row.symbol: row.hedge_mode for row in held if row.symbol in symbols}
    modes.update({s: on for s, on in remembered.items() if s not in modes})
    unknown = [s for s in symbols if s not in modes]
    at_1x: set[str] = set()
    if unknown:
        try:
            rows = await asyncio.gather(
                *(
                    calls.call(deps, deps.exchange.get_positions, credentials, symbol=s)
                    for s in unknown
                )
            )
        except BybitError as error:
            raise _refused(log, calls.classify(error, None, "read the position modes")) from None
        for symbol, symbol_rows in zip(unknown, rows, strict=True):
            modes[symbol] = any(row.hedge_mode for row in symbol_rows)
            if any(row.leverage == 1 for row in symbol_rows):
                at_1x.add(symbol)
    return modes, at_1x


def _check_filters(
    plan: Sequence[PositionLeg],
    instruments: Mapping[str, InstrumentFilters],
    prices: Mapping[str, Decimal],
    log: structlog.stdlib.BoundLogger,
) -> Decimal:
    """Every leg against its instrument's filters at the current price (the exchange's own
    minimum: the plan kept its headroom above it); returns the basket's notional."""
    required = Decimal(0)
    for leg in plan:
        rules, price = instruments[leg.symbol], prices[leg.symbol]
        required += leg.quantity * price
        violation = order_filter_violation(
            leg.symbol, leg.quantity, rules, price, keep_headroom=False
        )
        if violation is not None:
            raise _preflight_failure(log, leg_message(leg, violation.message), leg.leg)
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
                leg_message(
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
                leg_message(
                    leg,
                    f"you hold a {row.side} position of {row.size} {row.symbol} at "
                    f"{row.leverage.normalize():f}x; the basket trades at 1x, and setting 1x "
                    "would change that position's margin. Set it to 1x or close it first",
                ),
                leg.leg,
            )


def _preflight_failure(
    log: structlog.stdlib.BoundLogger, reason: str, leg: int | None
) -> PermanentRunError:
    log.error("preflight.failed", error=reason, leg=leg)
    return PermanentRunError(f"pre-flight: {reason}", leg=leg)


def _refused(log: structlog.stdlib.BoundLogger, error: RunError) -> RunError:
    """The exchange refused a pre-flight read: permanent (a refused key, say) fails the
    basket before any order."""
    if isinstance(error, PermanentRunError):
        log.error("preflight.failed", error=error.message, retcode=error.retcode)
    return error


async def ensure_leverage(
    deps: ExecutionDeps,
    credentials: ApiCredentials,
    leg: PositionLeg,
    log: structlog.stdlib.BoundLogger,
    *,
    confirmed: set[str] | None = None,
) -> None:
    """Leverage 1x on the leg's symbol: known (`confirmed`: the symbols the caller read from
    the memo), or set now."""
    account = credentials.account
    if confirmed is None:
        confirmed = await deps.memo.leverage_confirmed(account, [leg.symbol])
    if leg.symbol in confirmed:
        return
    try:
        changed = await calls.call(deps, deps.exchange.set_leverage, credentials, leg.symbol)
    except BybitError as error:
        if error.retcode == PORTFOLIO_MARGIN_LEVERAGE:
            # Portfolio margin has no leverage per symbol: the balance check is the 1x.
            await deps.memo.confirm_leverage(account, [leg.symbol])
            log.info("leverage.not_applicable", symbol=leg.symbol, reason="portfolio margin")
            return
        raise calls.classify(error, leg, "set leverage 1x") from None
    await deps.memo.confirm_leverage(account, [leg.symbol])
    log.info("leverage.set", symbol=leg.symbol, leverage="1", changed=changed)
