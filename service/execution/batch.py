"""Batch execution (`"execution": "batch"`): every leg's first order in create-batch requests,
then every fill read at once. What a partial fill leaves goes afterwards, one order at a time,
through the sequential protocol (service/execution/legs.py), as does everything a resumed run
finds recorded.

The same guarantees as one order at a time:
- every order has its deterministic orderLinkId, and a batch's orders are all marked submitted,
  in the round trip that proves the run still holds the position, before the batch is sent;
- an order an earlier run may have sent is looked up before anything is sent again; a batch
  whose answer is lost (a timeout, a 5xx, a cut reply) is resolved by looking up every order
  in it, and an order that is not found is left for the next run, which looks again first;
- each order's own answer (`retExtInfo.list[i]`, in the order sent) decides its leg: accepted,
  refused (its leg fails the position once the fills of the others are recorded: those legs
  are held, shown as exposure, nothing reversed), or sent again (Bybit's per-order rate limit
  or a changed position mode placed nothing).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import structlog

from service.bybit.client import BatchItem, MarketOrder
from service.bybit.errors import (
    BybitError,
    BybitIpBanError,
    BybitRateLimitError,
    DuplicateOrderLinkIdError,
)
from service.bybit.types import Order
from service.execution import calls, legs
from service.execution.deps import ExecutionDeps, Run
from service.execution.outcomes import (
    OwnershipLostError,
    PermanentRunError,
    RunError,
    TransientRunError,
    leg_message,
)
from service.execution.preflight import ensure_leverage
from service.models import PlannedLeg, PositionLeg, Trade
from service.positions import repository

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class FirstOrders:
    """What the first orders of a batch run came to."""

    # Every leg's first order, all of it filled, read by this run: nothing is left for the
    # sequential protocol.
    complete: bool
    # The fills of a complete basket, read and not yet recorded: they are recorded with its
    # ACTIVE, in one statement (states.finish). Otherwise every fill read is recorded already.
    unrecorded: Sequence[legs.Fill] = ()


@dataclass
class _Outcomes:
    """What became of the orders of one batch run."""

    placed: list[legs.LegOrder] = field(default_factory=list)
    refused: list[tuple[legs.LegOrder, RunError]] = field(default_factory=list)
    unknown: list[tuple[legs.LegOrder, RunError]] = field(default_factory=list)


async def send_first_orders(
    deps: ExecutionDeps,
    run: Run,
    plan: Sequence[PlannedLeg],
    recorded: Sequence[Trade],
    log: structlog.stdlib.BoundLogger,
    *,
    ends_position: Callable[[RunError], bool],
) -> FirstOrders:
    """Every leg's first order not recorded yet: looked up if it may have been sent, the rest
    sent in batches, then every fill read at once. Raises the run's error for the first leg
    that failed (refusals before unknown outcomes), after recording every fill; every leg
    refused for good is reported (`leg.failed`), and an unknown outcome that ends the
    position. A complete basket's fills are returned unrecorded, for its ACTIVE's
    statement."""
    links = {t.order_link_id for t in recorded}
    orders = [
        legs.LegOrder(leg, 0, leg.order_link_id, leg.quantity)
        for leg in plan
        if leg.order_link_id not in links
    ]
    if not orders:
        return FirstOrders(complete=False)
    outcomes = _Outcomes()
    try:
        try:
            await _send_all(deps, run, orders, outcomes, log)
        except (RunError, OwnershipLostError):
            # What did land is read and recorded before the run ends (a later run would
            # too, but a basket that fails here must show what it holds).
            _, landed = await _read_fills(deps, run, outcomes.placed, log)
            await legs.write_fills(deps, run, landed)
            raise
        orders_read, fills = await _read_fills(deps, run, outcomes.placed, log)
    finally:
        # Read slots taken ahead for orders that were not placed.
        deps.exchange.drop_slots_ahead(run.credentials)
    for leg_order, order in zip(outcomes.placed, orders_read, strict=True):
        if isinstance(order, RunError):
            outcomes.unknown.append((leg_order, order))
        elif order.cum_exec_qty <= 0:
            reason = f"order {order.order_id} ended {order.order_status} with nothing filled"
            nothing = PermanentRunError(
                leg_message(leg_order.leg, reason), leg=leg_order.leg.leg, label="nothing_filled"
            )
            nothing.bybit_order_id = order.order_id
            outcomes.refused.append((leg_order, nothing))
    complete = (
        not outcomes.refused
        and not outcomes.unknown
        and len(orders) == len(plan)
        and all(
            isinstance(order, Order) and order.cum_exec_qty >= leg_order.qty
            for leg_order, order in zip(outcomes.placed, orders_read, strict=True)
        )
    )
    if complete:
        return FirstOrders(complete=True, unrecorded=fills)
    # Recorded before the run goes on (a partial fill's remainder) or fails.
    await legs.write_fills(deps, run, fills)
    for leg_order, error in [*outcomes.refused, *outcomes.unknown]:
        legs.on_order(error, leg_order)
    refused = sorted(outcomes.refused, key=lambda f: f[0].leg.leg)
    for leg_order, error in refused:
        legs.report_failed(log, leg_order.leg, error)
    if refused:
        raise refused[0][1]
    unknown = sorted(outcomes.unknown, key=lambda f: f[0].leg.leg)
    if unknown:
        leg_order, error = unknown[0]
        if ends_position(error):
            legs.report_failed(log, leg_order.leg, error)
        raise error
    return FirstOrders(complete=False)


async def _send_all(
    deps: ExecutionDeps,
    run: Run,
    orders: list[legs.LegOrder],
    outcomes: _Outcomes,
    log: structlog.stdlib.BoundLogger,
) -> None:
    to_send = await _found_earlier(deps, run, orders, outcomes, log)
    openings = [
        o.leg
        for o in to_send
        if isinstance(o.leg, PositionLeg) and o.leg.symbol not in run.leverage_checked
    ]
    await calls.all_of(ensure_leverage(deps, run.credentials, leg, log) for leg in openings)
    size = deps.batch_max_orders
    for start in range(0, len(to_send), size):
        if outcomes.refused or outcomes.unknown:
            # The basket fails, or waits for its next run: sending more would only add to
            # what the user holds of a basket that is not complete.
            break
        await _send_chunk(deps, run, to_send[start : start + size], outcomes, log)


async def _found_earlier(
    deps: ExecutionDeps,
    run: Run,
    orders: list[legs.LegOrder],
    outcomes: _Outcomes,
    log: structlog.stdlib.BoundLogger,
) -> list[legs.LegOrder]:
    """Look up, all at once, the orders an earlier run may have sent; the others (and those
    not found) are to be sent."""
    maybe = [o for o in orders if o.may_have_been_sent]
    found = await calls.all_of(legs.lookup(deps, run.credentials, o) for o in maybe)
    seen = set()
    for leg_order, order in zip(maybe, found, strict=True):
        if order is not None:
            _log_for(log, leg_order).info("leg.found_existing", bybit_order_id=order.order_id)
            outcomes.placed.append(leg_order)
            seen.add(leg_order.link)
    return [o for o in orders if o.link not in seen]


def _log_for(
    log: structlog.stdlib.BoundLogger, leg_order: legs.LegOrder
) -> structlog.stdlib.BoundLogger:
    return legs.order_log(log, leg_order).bind(batch=True)


async def _send_chunk(
    deps: ExecutionDeps,
    run: Run,
    chunk: list[legs.LegOrder],
    outcomes: _Outcomes,
    log: structlog.stdlib.BoundLogger,
) -> None:
    """One create-batch request (and, for orders Bybit refused without placing them because
    of its per-order rate limit or a changed position mode, more of them)."""
    pending = chunk
    flipped: set[int] = set()
    for _ in range(deps.rate_limit_attempts):
        send = _sender(deps, run, pending, log)
        started = time.perf_counter()
        try:
            items = await calls.call_order(deps, send)
        except BybitError as error:
            await _whole_batch_failed(deps, run, pending, error, outcomes, log)
            return
        latency_ms = round((time.perf_counter() - started) * 1000, 1)
        again: list[legs.LegOrder] = []
        unclear: list[tuple[legs.LegOrder, BybitError]] = []
        for leg_order, item in zip(pending, items, strict=True):
            verdict = await _item_outcome(
                deps, run, leg_order, item, outcomes, log, latency_ms, flipped
            )
            if verdict == "resend":
                again.append(leg_order)
            elif verdict is not None:
                unclear.append((leg_order, verdict))
        # Orders whose own answer was ambiguous: looked up side by side.
        await calls.all_of(_resolve_ambiguous(deps, run, o, e, outcomes, log) for o, e in unclear)
        if not again:
            return
        # Refused for Bybit's per-order limit (the shared limiter, told the window is used
        # up, waits for it before the next send) or for a changed position mode.
        pending = again
    for leg_order in pending:
        held = TransientRunError(
            leg_message(leg_order.leg, "place order failed: Bybit's order rate limit held it"),
            leg=leg_order.leg.leg,
            label="rate_limit",
            pause=True,
        )
        outcomes.unknown.append((leg_order, held))


def _sender(
    deps: ExecutionDeps,
    run: Run,
    pending: list[legs.LegOrder],
    log: structlog.stdlib.BoundLogger,
) -> Callable[[], Awaitable[list[BatchItem]]]:
    batch = [_market_order(o) for o in pending]

    async def send() -> list[BatchItem]:
        # Every send (a re-send after Bybit refused the whole request for its rate limit
        # too) is proven right before it.
        await _prove_ownership(deps, run, pending)
        for leg_order in pending:
            _log_for(log, leg_order).info("leg.submitted", batch_size=len(pending))
        # The reads of their outcomes follow the answer: their slots are taken meanwhile.
        deps.exchange.order_read_slot_ahead(run.credentials, len(pending))
        return await deps.exchange.create_market_orders(run.credentials, batch)

    return send


def _market_order(leg_order: legs.LegOrder) -> MarketOrder:
    leg = leg_order.leg
    return MarketOrder(
        leg.symbol,
        leg.side,
        leg_order.qty,
        leg_order.link,
        position_idx=leg.position_idx,
        reduce_only=leg.reduce_only,
    )


async def _prove_ownership(deps: ExecutionDeps, run: Run, pending: list[legs.LegOrder]) -> None:
    """Right before a batch: time left to see it through, and the proof that this run still
    holds the position, in the round trip that marks every order of the batch submitted."""
    first = pending[0]
    legs.check_time_left(deps, run, first)
    # The request's rate-limit slot is taken while the proof runs (one left unused, the proof
    # failing, ages out counted: on the safe side).
    deps.exchange.batch_slot_ahead(run.credentials, len(pending))
    if not await run.prove(submitting_legs=[o.leg.leg for o in pending]):
        raise OwnershipLostError(
            leg_message(
                first.leg,
                "the run could not prove it still holds the position (its lock connection "
                "was lost, or the claim changed); nothing was sent",
            )
        )


async def _whole_batch_failed(
    deps: ExecutionDeps,
    run: Run,
    pending: list[legs.LegOrder],
    error: BybitError,
    outcomes: _Outcomes,
    log: structlog.stdlib.BoundLogger,
) -> None:
    """The request as a whole failed. Refused before anything was placed: every order of it is
    refused (permanent) or left for the next run (transient). Its answer lost: every order is
    looked up before anything is sent again."""
    if not error.ambiguous:
        for leg_order in pending:
            refused = calls.classify(error, leg_order.leg, "place order (batch)")
            if isinstance(refused, PermanentRunError):
                refused.placed_nothing = True
                await _mark_refused(deps, run, leg_order)
                outcomes.refused.append((leg_order, refused))
            else:
                outcomes.unknown.append((leg_order, refused))
        return
    log.warning("batch.outcome_unknown", error=str(error), orders=len(pending))
    await calls.all_of(_resolve_ambiguous(deps, run, o, error, outcomes, log) for o in pending)


async def _resolve_ambiguous(
    deps: ExecutionDeps,
    run: Run,
    leg_order: legs.LegOrder,
    error: BybitError,
    outcomes: _Outcomes,
    run_log: structlog.stdlib.BoundLogger,
) -> None:
    """An order whose answer is unknown: placed if it shows up. One that does not show within
    the visibility wait is left for the next run (which looks again before sending), or, for a
    retCode Bybit does not document, fails its leg."""
    log = _log_for(run_log, leg_order)
    log.warning("leg.outcome_unknown", error=str(error))
    try:
        found = await legs.lookup_patiently(deps, run.credentials, leg_order)
    except RunError as lookup_failed:
        outcomes.unknown.append((leg_order, lookup_failed))
        return
    if found is not None:
        log.info("leg.found_existing", bybit_order_id=found.order_id)
        outcomes.placed.append(leg_order)
        return
    leg = leg_order.leg
    if error.transient:
        unknown = TransientRunError(
            leg_message(leg, f"order outcome unknown: {error}"),
            leg=leg.leg,
            label="outcome_unknown",
        )
        outcomes.unknown.append((leg_order, unknown))
    else:
        outcomes.refused.append((leg_order, calls.classify(error, leg, "place order (batch)")))


async def _item_outcome(
    deps: ExecutionDeps,
    run: Run,
    leg_order: legs.LegOrder,
    item: BatchItem,
    outcomes: _Outcomes,
    run_log: structlog.stdlib.BoundLogger,
    latency_ms: float,
    flipped: set[int],
) -> Literal["resend"] | BybitError | None:
    """Record one order's own answer: "resend" when it placed nothing and is to be sent
    again, its error when the answer is ambiguous (to be looked up), None when settled."""
    log = _log_for(run_log, leg_order)
    if item.ack is not None:
        log.info("leg.accepted", bybit_order_id=item.ack.order_id, latency_ms=latency_ms)
        outcomes.placed.append(leg_order)
        return None
    error = item.error
    assert error is not None
    if isinstance(error, DuplicateOrderLinkIdError):
        # An earlier send of it landed: read it, never count it as a failure.
        log.warning("leg.duplicate_order_link_id")
        outcomes.placed.append(leg_order)
        return None
    if isinstance(error, BybitRateLimitError) and not isinstance(error, BybitIpBanError):
        # Bybit's per-order quota of the batch bucket: this order placed nothing.
        log.warning("leg.rate_limited", error=str(error))
        return "resend"
    leg = leg_order.leg
    if legs.wrong_position_idx(error) and leg.leg not in flipped:
        flipped.add(leg.leg)
        await legs.flip_position_idx(deps, run, leg, log)
        return "resend"
    if error.ambiguous:
        return error
    refused = calls.classify(error, leg, "place order (batch)")
    refused.placed_nothing = True
    if isinstance(refused, PermanentRunError):
        await _mark_refused(deps, run, leg_order)
        outcomes.refused.append((leg_order, refused))
    else:
        outcomes.unknown.append((leg_order, refused))
    return None


async def _mark_refused(deps: ExecutionDeps, run: Run, leg_order: legs.LegOrder) -> None:
    """Refused outright, so certainly not on the exchange: unless an earlier run may have sent
    it (a refusal of this send says nothing of that one, which may have landed unseen)."""
    if leg_order.may_have_been_sent:
        return
    async with deps.sessions() as session:
        await repository.mark_refused(session, run.position.id, leg_order.leg.leg, run.close_round)


async def _read_fills(
    deps: ExecutionDeps,
    run: Run,
    placed: list[legs.LegOrder],
    log: structlog.stdlib.BoundLogger,
) -> tuple[list[Order | RunError], list[legs.Fill]]:
    """Every placed order read until final, all at once: each order (or its read's error),
    and the fills to record, together (one statement: ten sessions side by side would hold
    ten connections for one write), by the caller. If the reads themselves end in an error
    (the run's deadline cancelling them), the fills read are recorded here before it is
    raised: a basket that stops here shows what it holds."""
    started = time.perf_counter()
    ready: list[legs.Fill] = []

    async def read(leg_order: legs.LegOrder) -> Order | RunError:
        try:
            order, fill = await legs.read_outcome(
                deps, run, leg_order, _log_for(log, leg_order), started
            )
        except RunError as error:
            return error
        if fill is not None:
            ready.append(fill)
        return order

    try:
        orders = await calls.all_of(read(o) for o in placed)
    except BaseException:
        if ready:
            try:
                await legs.write_fills(deps, run, ready)
            except Exception as error:  # the run's own error is the one that matters
                # The orders are marked submitted: the next run or reconciliation records
                # them.
                log.error("run.fill_unwritten", error=f"{type(error).__name__}: {error}")
        raise
    return orders, ready
