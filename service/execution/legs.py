"""The legs: the per-leg exchange protocol. Each leg's first order, then, while a partial
fill leaves a tradeable remainder, orders for the rest; each order looked up before it is
placed if it may have been sent, ownership proven right before it is, its outcome polled
until final, and its fill recorded at once."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_FLOOR, Decimal

import structlog

from service.bybit.auth import ApiCredentials
from service.bybit.errors import BybitError, DuplicateOrderLinkIdError, PermanentBybitError
from service.bybit.types import Order, OrderAck
from service.execution import calls
from service.execution.deps import ExecutionDeps, Run
from service.execution.outcomes import (
    OwnershipLostError,
    PermanentRunError,
    RunError,
    TransientRunError,
    leg_message,
)
from service.execution.preflight import ensure_leverage, position_idx_for
from service.market.data import MarketDataUnavailableError
from service.metrics import LEG_LATENCY
from service.models import PlannedLeg, PositionLeg, Trade
from service.positions import repository, run_statements
from service.trading_logic import order_filter_violation

logger = structlog.stdlib.get_logger("service.execution")


async def execute_legs(
    deps: ExecutionDeps,
    run: Run,
    plan: Sequence[PlannedLeg],
    recorded: Sequence[Trade],
    log: structlog.stdlib.BoundLogger,
    *,
    ends_position: Callable[[RunError], bool],
    deadline_expired: Callable[[], bool],
) -> None:
    """Every leg in order. A leg whose error ends the position (`ends_position`: permanent,
    or transient with no attempt left, the run's deadline included) is reported here, once,
    as `leg.failed`, always with the same fields. Every fill read is recorded before this
    returns or raises."""
    pipe = Pipeline(deps, run, plan, recorded)
    try:
        for leg in plan:
            try:
                legs_trades = [t for t in recorded if t.leg == leg.leg]
                await _execute_leg(deps, run, leg, legs_trades, log, pipe)
            except RunError as error:
                if error.leg == leg.leg and ends_position(error):
                    report_failed(log, leg, error)
                raise
            except asyncio.CancelledError:
                # The run's deadline cancels it where it is (asyncio.timeout): on the last
                # attempt that fails the position at this leg.
                if deadline_expired():
                    passed = TransientRunError(
                        "the run's deadline passed before it finished",
                        leg=leg.leg,
                        label="deadline",
                    )
                    if ends_position(passed):
                        report_failed(log, leg, passed)
                raise
    except BaseException:
        # The leg's own error is the run's: what is left of the pipeline is settled quietly.
        await pipe.settle(failing=True)
        raise
    await pipe.settle(failing=False)


# A proof of ownership taken ahead (while the previous leg's fill was read) is used only this
# fresh: an order must follow its proof closely (a run that lost its lock sends nothing).
PROOF_FRESH_SECONDS = 0.25


class Pipeline:
    """What a sequential run takes off the critical path between two orders.

    - A fill is written while the next order is in flight. A run that dies before the write
      commits has the order marked submitted: the next run looks it up and records it.
    - The next leg's ownership proof, which marks its order submitted, is taken while this
      leg's fill is read. If this leg then fails, the mark is withdrawn: that order was
      certainly not sent (the run holds the lock; nobody else sends it).
    """

    def __init__(
        self, deps: ExecutionDeps, run: Run, plan: Sequence[PlannedLeg], recorded: Sequence[Trade]
    ) -> None:
        self._deps, self._run, self._plan = deps, run, list(plan)
        self._recorded = {t.order_link_id for t in recorded}
        self._writes: list[asyncio.Task[None]] = []
        self._ahead: dict[int, tuple[float, asyncio.Task[bool]]] = {}

    def write(self, work: Awaitable[None]) -> None:
        self._writes.append(asyncio.ensure_future(work))

    async def settle(self, *, failing: bool) -> None:
        """No proof left running on the lock's connection, a mark taken ahead for an order
        that was never sent withdrawn, and every write committed. A write that failed is
        raised, unless the run is failing already (then it is logged: the order is marked
        submitted, so the next run or reconciliation records its fill)."""
        self._deps.exchange.drop_slots_ahead(self._run.credentials)
        ahead, self._ahead = self._ahead, {}
        if ahead:
            # asyncio.wait: the tasks' own errors are not raised here, a cancellation is.
            await asyncio.wait([task for _, task in ahead.values()])
            for leg, (_, task) in ahead.items():
                if not task.cancelled() and task.exception() is None and task.result():
                    await self._withdraw(leg)
        writes, self._writes = self._writes, []
        if not writes:
            return
        results = await asyncio.gather(*writes, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for error in errors if failing else errors[1:]:
            logger.error("run.fill_unwritten", error=f"{type(error).__name__}: {error}")
        if errors and not failing:
            raise errors[0]

    def prove_next(self, leg: PlannedLeg) -> None:
        """Start the ownership proof of the leg after `leg`, if its first order is the next to
        be sent (not recorded, never marked)."""
        following = self._following(leg)
        if following is None or following.leg in self._ahead:
            return
        if following.submitted_at is not None or following.order_link_id in self._recorded:
            return
        # The order's rate-limit slot too, so that it goes out as soon as this fill is read.
        self._deps.exchange.order_slot_ahead(self._run.credentials)
        started = asyncio.get_running_loop().time()
        task = asyncio.ensure_future(self._run.prove(submitting_legs=(following.leg,)))
        self._ahead[following.leg] = (started, task)

    async def proof(self, leg_order: LegOrder) -> bool | None:
        """The proof taken ahead for this order, if fresh; None: prove it now."""
        ahead = self._ahead.pop(leg_order.leg.leg, None)
        if ahead is None or leg_order.remainder != 0:
            return None
        started, task = ahead
        proven = await task
        fresh = asyncio.get_running_loop().time() - started <= PROOF_FRESH_SECONDS
        return proven if fresh or not proven else None

    async def _withdraw(self, leg: int) -> None:
        """A mark taken ahead for an order that was never sent (the run failed first)."""
        try:
            async with self._deps.sessions() as session:
                await repository.unmark_submitted(
                    session,
                    self._run.position.id,
                    leg,
                    self._run.close_round,
                    self._run.lease.pid,
                )
        except Exception as error:  # the leg's own error is the one that matters
            # Left marked: a later run looks the order up (finds nothing) before sending it.
            logger.warning("run.mark_not_withdrawn", leg=leg, error=str(error))

    def _following(self, leg: PlannedLeg) -> PlannedLeg | None:
        for earlier, later in itertools.pairwise(self._plan):
            if earlier.leg == leg.leg:
                return later
        return None


def order_log(
    log: structlog.stdlib.BoundLogger, leg_order: LegOrder
) -> structlog.stdlib.BoundLogger:
    """The audit fields every event of one order of a leg carries."""
    leg = leg_order.leg
    return log.bind(
        leg=leg.leg,
        symbol=leg.symbol,
        side=leg.side,
        qty=str(leg_order.qty),
        order_link_id=leg_order.link,
        remainder=leg_order.remainder,
    )


def report_failed(log: structlog.stdlib.BoundLogger, leg: PlannedLeg, error: RunError) -> None:
    log.error(
        "leg.failed",
        leg=leg.leg,
        symbol=leg.symbol,
        side=leg.side,
        qty=str(error.qty if error.qty is not None else leg.quantity),
        order_link_id=error.order_link_id or leg.order_link_id,
        bybit_order_id=error.bybit_order_id,
        error=error.message,
        retcode=error.retcode,
    )


def on_order(error: RunError, leg_order: LegOrder) -> RunError:
    """Note the order an error happened on (the first one noted stands)."""
    if error.order_link_id is None:
        error.order_link_id, error.qty = leg_order.link, leg_order.qty
    return error


@dataclass(frozen=True, slots=True)
class LegOrder:
    """One order of a leg: the first (`remainder` 0), or one for a partial fill's remainder."""

    leg: PlannedLeg
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
    run: Run,
    leg: PlannedLeg,
    recorded: Sequence[Trade],
    run_log: structlog.stdlib.BoundLogger,
    pipe: Pipeline | None = None,
) -> None:
    """The leg's first order, then, while it falls short of the plan and the rest can be
    traded, up to `remainder_attempts` more for the remainder. A market order is an IOC within
    a price band: on a thin book it fills only in part, and the rest is cancelled."""
    log = run_log.bind(leg=leg.leg, symbol=leg.symbol, side=leg.side)
    links = {t.order_link_id for t in recorded}
    filled = sum((t.quantity for t in recorded), Decimal(0))
    if leg.order_link_id not in links:
        # A close's reduce-only order adds no margin; this run's pre-flight saw the rest.
        if isinstance(leg, PositionLeg) and leg.symbol not in run.leverage_checked:
            await ensure_leverage(deps, run.credentials, leg, log)
        first = LegOrder(leg, 0, leg.order_link_id, leg.quantity)
        order = await _send_and_record(deps, run, first, log, pipe=pipe)
        assert order is not None  # a refusal of the first order raises
        if order.cum_exec_qty <= 0:
            reason = f"order {order.order_id} ended {order.order_status} with nothing filled"
            error = PermanentRunError(leg_message(leg, reason), leg=leg.leg, label="nothing_filled")
            error.bybit_order_id = order.order_id
            raise on_order(error, first)
        filled += order.cum_exec_qty
    for remainder in range(1, deps.remainder_attempts + 1):
        if filled >= leg.quantity:
            return
        link = leg.remainder_link(remainder)
        if link in links:
            continue  # recorded by an earlier run: already counted in `filled`
        if remainder <= leg.remainders_submitted:
            # An earlier run may have sent it: what it filled counts, whatever the book or
            # the price are now.
            sent = LegOrder(leg, remainder, link, leg.quantity - filled)
            try:
                found = await lookup_patiently(deps, run.credentials, sent)
                if found is not None:
                    log.info(
                        "leg.found_existing", order_link_id=link, bybit_order_id=found.order_id
                    )
                    order = await record_outcome(
                        deps, run, sent, log, time.perf_counter(), pipe=pipe
                    )
                    filled += order.cum_exec_qty
                    continue
            except RunError as error:
                raise on_order(error, sent) from None
        qty = await _tradeable_remainder(deps, leg, leg.quantity - filled)
        if qty is None:
            break
        placed = await _send_and_record(
            deps, run, LegOrder(leg, remainder, link, qty), log, refusal_ends_leg=True, pipe=pipe
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


async def _tradeable_remainder(
    deps: ExecutionDeps, leg: PlannedLeg, remainder: Decimal
) -> Decimal | None:
    """The remainder as an order the exchange accepts now (a multiple of qtyStep, at least
    minOrderQty and minNotionalValue at the current price), or None: it is the shortfall."""
    action = "market data for the remainder"
    try:
        instruments = await calls.checked(deps, action, leg, deps.market.instruments, [leg.symbol])
        prices = await calls.checked(
            deps, action, leg, deps.market.prices, [leg.symbol], max_age=deps.market_max_age_seconds
        )
    except MarketDataUnavailableError:
        return None
    rules, price = instruments[leg.symbol], prices[leg.symbol]
    steps = (remainder / rules.qty_step).to_integral_value(rounding=ROUND_FLOOR)
    qty = min((steps * rules.qty_step).quantize(rules.qty_step), rules.max_mkt_order_qty)
    # The price is a few seconds old and may have moved against the leg (that is what thinned
    # the book): keep the same headroom above the minimum as planning does.
    violation = order_filter_violation(
        leg.symbol, qty, rules, price, keep_headroom=True, reduce_only=leg.reduce_only
    )
    if violation is not None:
        return None
    return qty


async def _send_and_record(
    deps: ExecutionDeps,
    run: Run,
    leg_order: LegOrder,
    run_log: structlog.stdlib.BoundLogger,
    *,
    refusal_ends_leg: bool = False,
    pipe: Pipeline | None = None,
) -> Order | None:
    """Place one order of a leg (looked up first if it may have been sent), wait until it is
    final, and record its fill at once. `refusal_ends_leg` (remainder orders): a refusal that
    placed nothing (110094 after the price moved, say) ends the leg's tries (None) instead of
    failing the basket."""
    try:
        return await _send_and_record_order(deps, run, leg_order, run_log, refusal_ends_leg, pipe)
    except RunError as error:
        raise on_order(error, leg_order) from None


async def _send_and_record_order(
    deps: ExecutionDeps,
    run: Run,
    leg_order: LegOrder,
    run_log: structlog.stdlib.BoundLogger,
    refusal_ends_leg: bool,
    pipe: Pipeline | None,
) -> Order | None:
    credentials = run.credentials
    log = order_log(run_log, leg_order)
    started = time.perf_counter()
    order: Order | None = None
    if leg_order.may_have_been_sent:
        # A previous run may have sent it (and died, or lost the reply): look before placing.
        order = await lookup(deps, credentials, leg_order)
        if order is not None:
            log.info("leg.found_existing", bybit_order_id=order.order_id)
    if order is None:
        first_send = not leg_order.may_have_been_sent
        await _prove_ownership(deps, run, leg_order, pipe)
        log.info("leg.submitted")
        if pipe is not None:
            # The read of its outcome follows the order's answer: its slot is taken meanwhile.
            deps.exchange.order_read_slot_ahead(credentials)
        try:
            await _place(deps, run, leg_order, log)
        except PermanentRunError as error:
            if error.placed_nothing and first_send and leg_order.remainder == 0:
                # Marked submitted, but certainly not on the exchange: nothing to look up.
                async with deps.sessions() as session:
                    await repository.mark_refused(
                        session, run.position.id, leg_order.leg.leg, run.close_round
                    )
            if not refusal_ends_leg:
                raise
            log.warning("leg.remainder_refused", error=error.message)
            return None
    if pipe is not None:
        pipe.prove_next(leg_order.leg)
    return await record_outcome(deps, run, leg_order, log, started, pipe=pipe)


async def record_outcome(
    deps: ExecutionDeps,
    run: Run,
    leg_order: LegOrder,
    log: structlog.stdlib.BoundLogger,
    started: float,
    *,
    pipe: Pipeline | None = None,
) -> Order:
    """Wait until the order is final and record its fill: at once, or (`pipe`) while the run
    goes on, committed before the run ends."""
    order, fill = await read_outcome(deps, run, leg_order, log, started)
    if fill is not None:
        write = write_fills(deps, run, [fill])
        if pipe is None:
            await write
        else:
            pipe.write(write)
    return order


@dataclass(frozen=True, slots=True)
class Fill:
    """A filled order of a leg, read and not yet recorded."""

    leg_order: LegOrder
    order: Order
    price: Decimal
    latency_ms: float
    log: structlog.stdlib.BoundLogger


async def read_outcome(
    deps: ExecutionDeps,
    run: Run,
    leg_order: LegOrder,
    log: structlog.stdlib.BoundLogger,
    started: float,
) -> tuple[Order, Fill | None]:
    """Wait until the order is final: it, and its fill to record (None when nothing filled,
    which is logged here)."""
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
        return order, None
    price = order.avg_price or await _average_price(deps, credentials, leg_order, order)
    return order, Fill(leg_order, order, price, latency_ms, log)


async def write_fills(deps: ExecutionDeps, run: Run, fills: Sequence[Fill]) -> None:
    """Record fills of the run's position, in one statement on the lock connection, then log
    each (`leg.filled`)."""
    if not fills:
        return
    await run_statements.record_fills(run.lease, run.position.id, fill_rows(run, fills))
    report_filled(fills)


def fill_rows(run: Run, fills: Sequence[Fill]) -> list[run_statements.FillValues]:
    """The `trades` rows of fills of the run's position."""
    rows = []
    for f in fills:
        values = trade_values(run.position.id, f.leg_order, f.order, f.price)
        del values["position_id"]
        rows.append(run_statements.FillValues(**values))  # type: ignore[arg-type]
    return rows


def report_filled(fills: Sequence[Fill]) -> None:
    """`leg.filled` for each fill recorded."""
    for fill in fills:
        order = fill.order
        LEG_LATENCY.labels("filled").observe(fill.latency_ms / 1000)
        fill.log.info(
            "leg.filled",
            bybit_order_id=order.order_id,
            price=str(fill.price),
            filled_qty=str(order.cum_exec_qty),
            partial=order.cum_exec_qty < fill.leg_order.qty,
            order_status=order.order_status,
            fee=str(order.cum_exec_fee) if order.cum_exec_fee is not None else None,
            fee_coin=order.fee_coin,
            latency_ms=fill.latency_ms,
        )


def trade_values(
    position_id: uuid.UUID, leg_order: LegOrder | PlannedLeg, order: Order, price: Decimal
) -> dict[str, object]:
    """The `trades` row of one filled order."""
    leg = leg_order.leg if isinstance(leg_order, LegOrder) else leg_order
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
        "phase": "close" if leg.reduce_only else "open",
        "executed_at": order.updated_at or datetime.now(UTC),
    }


async def _prove_ownership(
    deps: ExecutionDeps, run: Run, leg_order: LegOrder, pipe: Pipeline | None = None
) -> None:
    """Right before an order: enough time left to see it through, and proof, on the lock's
    own connection, that this run still holds the position (the same round trip marks the
    order submitted, so a later run looks it up before placing anything). A proof `pipe`
    took moments ago, while the previous fill was read, stands for it."""
    leg = leg_order.leg
    check_time_left(deps, run, leg_order)
    proven = await pipe.proof(leg_order) if pipe is not None else None
    if proven is None:
        proven = await run.prove(
            submitting_legs=(leg.leg,), submitting_remainder=leg_order.remainder
        )
    if not proven:
        raise OwnershipLostError(
            leg_message(
                leg,
                "the run could not prove it still holds the position (its lock connection "
                "was lost, or the claim changed); nothing was sent",
            )
        )


def check_time_left(deps: ExecutionDeps, run: Run, leg_order: LegOrder) -> None:
    """Enough time left before the run's deadline to see an order through."""
    leg = leg_order.leg
    if run.deadline is not None:
        left = run.deadline - asyncio.get_running_loop().time()
        if left < deps.order_time_reserve:
            raise TransientRunError(
                leg_message(
                    leg,
                    f"only {max(left, 0):.1f} s left before the run's deadline, less than an "
                    f"order may take ({deps.order_time_reserve:g} s); left for the next attempt",
                ),
                leg=leg.leg,
                label="deadline",
            )


async def _place(
    deps: ExecutionDeps, run: Run, leg_order: LegOrder, log: structlog.stdlib.BoundLogger
) -> None:
    leg, credentials = leg_order.leg, run.credentials
    sent = 0
    flipped = False

    async def create() -> OrderAck:
        return await deps.exchange.create_market_order(
            credentials,
            symbol=leg.symbol,
            side=leg.side,
            qty=leg_order.qty,
            order_link_id=leg_order.link,
            position_idx=leg.position_idx,
            reduce_only=leg.reduce_only,
        )

    async def send() -> OrderAck:
        nonlocal sent, flipped
        sent += 1
        if sent > 1:
            # A re-send after a rate-limit refusal is an order too: prove ownership again.
            await _prove_ownership(deps, run, leg_order)
        try:
            return await create()
        except PermanentBybitError as error:
            if flipped or not wrong_position_idx(error):
                raise
        flipped = True
        await flip_position_idx(deps, run, leg, log)
        await _prove_ownership(deps, run, leg_order)
        return await create()

    try:
        # Only a refusal that certainly placed nothing (the rate limit) is re-sent here;
        # every other failure goes through the lookup or the next run.
        ack = await calls.call_order(deps, send)
        log.info("leg.accepted", bybit_order_id=ack.order_id)
    except DuplicateOrderLinkIdError:
        # The first attempt landed: read it, never count it as a failure.
        log.warning("leg.duplicate_order_link_id")
    except BybitError as error:
        if not error.ambiguous:
            refused = calls.classify(error, leg, "place order")
            refused.placed_nothing = True
            raise refused from None
        log.warning("leg.outcome_unknown", error=str(error))
        if not error.transient:
            # A retCode Bybit does not document: the order may have landed and not be listed
            # yet. Look for it for a while; only if it never shows does the leg fail with it.
            if await lookup_patiently(deps, credentials, leg_order) is None:
                raise calls.classify(error, leg, "place order") from None
            return
        if await lookup(deps, credentials, leg_order) is None:
            # Absent now; it may still appear. The next run looks again before re-sending.
            raise TransientRunError(
                leg_message(leg, f"order outcome unknown: {error}"),
                leg=leg.leg,
                label="outcome_unknown",
            ) from None


def wrong_position_idx(error: BybitError) -> bool:
    return error.retcode == 10001 and "position idx" in error.message.lower()


async def flip_position_idx(
    deps: ExecutionDeps, run: Run, leg: PlannedLeg, log: structlog.stdlib.BoundLogger
) -> None:
    """The symbol's position mode changed since it was read (the order placed nothing): the
    other mode's index, remembered for the account, and kept for the leg, so a later run of it
    (and a close of the position this one opens) sends the right one."""
    hedge = leg.position_idx == 0
    leg.position_idx = position_idx_for(leg.opening_side, hedge=hedge)
    await deps.memo.remember_hedge_modes(run.credentials.account, {leg.symbol: hedge})
    async with deps.sessions() as session:
        await repository.set_position_idx(
            session, run.position.id, {leg.leg: leg.position_idx}, close_round=run.close_round
        )
    log.warning("leg.position_mode_changed", hedge_mode=hedge)


async def lookup(
    deps: ExecutionDeps, credentials: ApiCredentials, leg_order: LegOrder
) -> Order | None:
    return await calls.checked(
        deps,
        "look up order",
        leg_order.leg,
        deps.exchange.get_order,
        credentials,
        symbol=leg_order.leg.symbol,
        order_link_id=leg_order.link,
    )


async def lookup_patiently(
    deps: ExecutionDeps, credentials: ApiCredentials, leg_order: LegOrder
) -> Order | None:
    """Look the order up until it shows or `visibility_wait_seconds` have passed: Bybit
    lists an accepted order a moment after it answers."""
    deadline = time.monotonic() + deps.visibility_wait_seconds
    pause = 0.05
    while True:
        order = await lookup(deps, credentials, leg_order)
        if order is not None or time.monotonic() >= deadline:
            return order
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.5)


async def _await_outcome(
    deps: ExecutionDeps, credentials: ApiCredentials, leg_order: LegOrder
) -> Order:
    """Bybit acknowledges before it fills, and lists the order a moment later: poll it until
    it is final."""
    leg = leg_order.leg
    deadline = time.monotonic() + deps.fill_timeout
    pause = 0.02
    while True:
        order = await lookup(deps, credentials, leg_order)
        if order is not None and order.is_final:
            return order
        if time.monotonic() >= deadline:
            state = order.order_status if order else "not visible"
            raise TransientRunError(
                leg_message(leg, f"order not final after {deps.fill_timeout}s ({state})"),
                leg=leg.leg,
                label="fill_timeout",
            )
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.5)


async def _average_price(
    deps: ExecutionDeps, credentials: ApiCredentials, leg_order: LegOrder, order: Order
) -> Decimal:
    leg = leg_order.leg
    executions = await calls.checked(
        deps,
        "read executions",
        leg,
        deps.exchange.get_executions,
        credentials,
        symbol=leg.symbol,
        order_id=order.order_id,
    )
    quantity = sum((e.exec_qty for e in executions), Decimal(0))
    if quantity <= 0:
        raise TransientRunError(
            leg_message(leg, "fills not visible yet"), leg=leg.leg, label="fills_not_visible"
        )
    return sum((e.exec_price * e.exec_qty for e in executions), Decimal(0)) / quantity
