"""Closing a position: per leg it holds, a reduce-only market order (the opposite side, the
positionIdx of the position it reduces) for exactly the quantity this position holds on that
symbol, so another basket's quantity on the same symbol is never touched.

A close has the opening's guarantees: the run holds the position's lock and the account's
(one basket's orders at a time per account), claims the CLOSING position's round, plans the
round once (`position_close_legs`) and places each order through the same per-leg protocol
(`legs`: deterministic orderLinkIds of the round's own, looked up before any re-send,
remainders of partial fills, ownership proven before each order), with the same retries,
deadline and recovery sweep. Unlike the opening, a leg that fails for good does not stop the
others: every leg is tried, and the round ends CLOSED (all flat for this position) or
CLOSE_FAILED (naming each leg still held and why); a CLOSE_FAILED position can be closed
again, in a new round with new orderLinkIds for what is still held.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal

import structlog

from service.bybit.auth import ApiCredentials
from service.bybit.errors import BybitError
from service.execution import accounts, calls, legs, runs
from service.execution.deps import ExecutionDeps, Run, RunLease
from service.execution.outcomes import (
    CredentialsUnreadableError,
    Outcome,
    OwnershipLostError,
    PermanentRunError,
    RunError,
    RunResult,
    TransientRunError,
    leg_message,
)
from service.models import (
    PlannedLeg,
    PositionCloseLeg,
    PositionStatus,
    SyntheticPosition,
    Trade,
)
from service.models.position import close_link_id
from service.positions import repository
from service.positions.status import Transition, change_status

logger = structlog.stdlib.get_logger("service.execution")


async def close_position(
    deps: ExecutionDeps,
    position: SyntheticPosition,
    task_id: str,
    lease: RunLease,
    deadline: float | None,
) -> RunResult:
    """Run (or resume) the CLOSING position's round, holding its lock already."""
    log = logger.bind()
    result: RunResult | None = None
    holder: SyntheticPosition | None = None
    async with lease.account(
        position.user_id, wait_seconds=deps.account_lock_wait_seconds
    ) as account_locked:
        if account_locked:
            holder = await accounts.holder_of(deps, lease, position)
            if holder is None:
                result = await _close_holding_account(deps, position, task_id, lease, deadline, log)
    if result is None:
        # Another basket of the account is opening or closing: ask again shortly, with no
        # attempt used (a close never fails for waiting).
        await accounts.mark_waiting(deps, position.id)
        log.info(
            "position.waiting_for_account",
            busy_with=str(holder.id) if holder is not None else "the account's lock",
            retry_in_s=deps.account_retry_seconds,
        )
        return RunResult(
            Outcome.RETRY, retry_in=deps.account_retry_seconds, detail="waiting for the account"
        )
    if result.outcome in (Outcome.CLOSED, Outcome.CLOSE_FAILED):
        await accounts.hand_off(deps, position.user_id, log)
    return result


async def _close_holding_account(
    deps: ExecutionDeps,
    position: SyntheticPosition,
    task_id: str,
    lease: RunLease,
    deadline: float | None,
    log: structlog.stdlib.BoundLogger,
) -> RunResult:
    key: ApiCredentials | None = None
    refusal: str | None = None
    try:
        key = await runs.credentials(deps, lease, position)
    except CredentialsUnreadableError as error:
        log.error("run.credentials_unreadable", error=str(error))
        asked = position.close_requested_at or position.updated_at
        waited = (datetime.now(UTC) - asked).total_seconds()
        if position.claim is not None or waited <= deps.unreadable_key_grace_seconds:
            # A round under way is never ended for it (a rotation rolling out): the sweep
            # sends it again, as it does an opening's.
            return RunResult(Outcome.ABORTED, detail=str(error))
        refusal = (
            f"the stored API key cannot be decrypted ({error}); store it again with "
            "PUT /api/credentials and close again. No order was sent"
        )
    except PermanentRunError as error:
        refusal = f"{error.message}; no order was sent"
    async with deps.sessions() as session:
        claimed = await repository.claim_close(session, position.id, task_id, lock_pid=lease.pid)
    if claimed is None:
        log.info("position.discarded", reason="the claim changed before this run could take it")
        return RunResult(Outcome.DISCARDED, detail="claim lost")
    structlog.contextvars.bind_contextvars(
        attempt=claimed.attempts, close_round=claimed.close_round
    )
    log.info("position.close_claimed", close_round=claimed.close_round)
    if key is None:
        assert refusal is not None
        return await _end(deps, claimed, task_id, lease, [], log, refusal=refusal)
    run = Run(
        claimed,
        task_id,
        key,
        lease,
        deadline,
        retries_done=claimed.attempts - 1,
        close_round=claimed.close_round,
    )
    return await _close_claimed(deps, run, log)


async def _close_claimed(
    deps: ExecutionDeps, run: Run, log: structlog.stdlib.BoundLogger
) -> RunResult:
    deadline = asyncio.timeout_at(run.deadline)
    deferred: list[TransientRunError] = []
    try:
        async with deadline:
            await _check_account(deps, run)
            plan = await _plan_round(deps, run, log)
            recorded = await _recorded(deps, run.position, plan)
            for leg in plan:
                if leg.error is not None or leg.closed_elsewhere > 0:
                    continue  # ended earlier in this round
                retry = await _close_leg(deps, run, leg, recorded, log, deadline.expired)
                if retry is not None:
                    deferred.append(retry)  # the other legs are still tried
    except TimeoutError:
        if not deadline.expired():
            raise
        log.warning("run.deadline_passed")
        passed = TransientRunError("the run's deadline passed before it finished", label="deadline")
        if not runs.ends_run(deps, run, passed):
            return await runs.schedule_retry(deps, run, passed, log)
        return await _finish(deps, run, log, unfinished=passed.message)
    except OwnershipLostError as error:
        log.error("position.ownership_lost", error=str(error))
        return RunResult(Outcome.DISCARDED, detail="ownership lost")
    except TransientRunError as error:
        # Before any leg: the account check, or looking up the orders sent before.
        if not runs.ends_run(deps, run, error):
            return await runs.schedule_retry(deps, run, error, log)
        reason = f"gave up after {run.retries_done + 1} attempts: {error.message}"
        return await _finish(deps, run, log, refusal=f"{reason}; close again")
    except PermanentRunError as error:
        return await _finish(deps, run, log, refusal=error.message)
    if deferred:
        # The latest the exchange asked for decides when the next run comes.
        worst = max(deferred, key=lambda e: e.retry_after or 0.0)
        others = [e for e in deferred if e is not worst]
        return await runs.schedule_retry(deps, run, worst, log, also=others)
    return await _finish(deps, run, log)


async def _check_account(deps: ExecutionDeps, run: Run) -> None:
    """The stored key must trade the account the opening traded: a key of another account
    would sell what that account holds, not this position."""
    opened_on = run.position.exchange_uid
    if opened_on is None:
        return  # opened before the UID was kept
    try:
        uid = await calls.call(deps, deps.exchange.get_account_uid, run.credentials)
    except BybitError as error:
        raise calls.classify(error, None, "read the key's account") from None
    if uid != opened_on:
        raise PermanentRunError(
            f"the stored Bybit key is for account {uid}, but this position was opened on "
            f"account {opened_on}: store a key of that account with PUT /api/credentials and "
            "close again. No order was sent"
        )


async def _plan_round(
    deps: ExecutionDeps, run: Run, log: structlog.stdlib.BoundLogger
) -> Sequence[PositionCloseLeg]:
    """The round's stored plan, or, for a new round, every order sent before settled first
    and then the plan made from the fills."""
    assert run.close_round is not None
    async with deps.sessions() as session:
        stored = await repository.get_close_plan(session, run.position.id, run.close_round)
    if stored:
        return stored
    await _settle_sent_orders(deps, run, log)
    return await ensure_close_plan(deps, run.position, log)


async def _settle_sent_orders(
    deps: ExecutionDeps, run: Run, log: structlog.stdlib.BoundLogger
) -> None:
    """Every order this position may have sent whose fill is not recorded (the opening's, or
    an earlier round's: a run that died after an order, a lookup that kept failing, a
    deadline) is looked up by its orderLinkId, and what it filled is recorded, before a
    round is planned from the fills: what was sold already is never sold again."""
    position = run.position
    async with deps.sessions() as session:
        opening = list(await repository.get_plan(session, position.id))
        earlier = [
            leg
            for leg in await repository.get_close_plans_of(session, [position.id])
            if leg.round != run.close_round
        ]
        recorded = {t.order_link_id for t in await repository.get_trades(session, position.id)}
    every: list[PlannedLeg] = [*opening, *earlier]
    sent = [leg for leg in every if leg.submitted_at is not None]
    for leg in sent:
        links = [] if leg.refused_at is not None else [(0, leg.order_link_id)]
        links += [(n, leg.remainder_link(n)) for n in range(1, leg.remainders_submitted + 1)]
        for remainder, link in links:
            if link in recorded:
                continue
            order = legs.LegOrder(leg, remainder, link, leg.quantity)
            if await legs.lookup_patiently(deps, run.credentials, order) is None:
                continue  # never placed
            leg_log = legs.order_log(log, order).bind(phase="close" if leg.reduce_only else "open")
            leg_log.info("leg.found_existing", settled_before_round=run.close_round)
            await legs.record_outcome(deps, run, order, leg_log, time.perf_counter())


async def _close_leg(
    deps: ExecutionDeps,
    run: Run,
    leg: PositionCloseLeg,
    recorded: Sequence[Trade],
    log: structlog.stdlib.BoundLogger,
    deadline_expired: Callable[[], bool],
) -> TransientRunError | None:
    """Try one leg: its orders (legs.execute_legs), then, if it is not flat for this
    position, why. A transient error is handed back (the leg is tried again by the next
    run); a refusal, a shortfall or the last attempt's error ends the leg in this round
    (`leg.failed`), unless the exchange holds nothing of it any more."""
    error: RunError | None = None
    try:
        await legs.execute_legs(
            deps,
            run,
            [leg],
            recorded,
            log,
            ends_position=lambda _: False,  # reported here, once the exchange is asked
            deadline_expired=deadline_expired,
        )
    except PermanentRunError as refused:
        error = refused
    except TransientRunError as transient:
        if not runs.ends_run(deps, run, transient):
            return transient
        # Its orders may have landed unseen: the next round looks them up before planning.
        transient.message = f"gave up after {run.retries_done + 1} attempts: {transient.message}"
        await _fail_leg(deps, run, leg, transient, log)
        return None
    remaining = leg.quantity - await _closed_in_round(deps, run, leg)
    if remaining <= 0:
        return None
    if await _exchange_holds_none(deps, run, leg):
        # A reduce-only order is capped at (or refused for) what the exchange holds: the
        # rest was reduced outside the service. Not held, not sold by this round.
        assert run.close_round is not None
        leg.closed_elsewhere = remaining
        async with deps.sessions() as session:
            await repository.set_closed_elsewhere(
                session, run.position.id, run.close_round, leg.leg, remaining
            )
        log.warning(
            "leg.closed_elsewhere",
            leg=leg.leg,
            symbol=leg.symbol,
            side=leg.side,
            qty=str(remaining),
            order_link_id=leg.order_link_id,
            error=error.message if error else None,
        )
        return None
    if error is None:
        shortfall = _shortfall(leg, leg.quantity - remaining)
        error = PermanentRunError(leg_message(leg, shortfall), leg=leg.leg, label="shortfall")
        error.qty = remaining
    await _fail_leg(deps, run, leg, error, log)
    return None


async def _closed_in_round(deps: ExecutionDeps, run: Run, leg: PositionCloseLeg) -> Decimal:
    links = _round_links([leg], deps.remainder_attempts)
    async with deps.sessions() as session:
        trades = await repository.get_trades(session, run.position.id)
    return sum((t.quantity for t in trades if t.order_link_id in links), Decimal(0))


async def _exchange_holds_none(deps: ExecutionDeps, run: Run, leg: PositionCloseLeg) -> bool:
    """Does the exchange hold nothing on the leg's side of its symbol (positionIdx)? False
    when that cannot be read: the leg's failure then stands."""
    try:
        rows = await calls.checked(
            deps,
            "read the position",
            leg,
            deps.exchange.get_positions,
            run.credentials,
            symbol=leg.symbol,
        )
    except RunError:
        return False
    # By side, whatever the positionIdx (one-way: 0; hedge: 1 long, 2 short): a mode read
    # wrong never makes a held position look gone.
    held = sum((row.size for row in rows if row.side == leg.opening_side), Decimal(0))
    return held == 0


def held_by_leg(trades: Sequence[Trade]) -> dict[int, Decimal]:
    """What each leg holds from the recorded fills: opened less closed."""
    held: dict[int, Decimal] = {}
    for trade in trades:
        signed = trade.quantity if trade.phase == "open" else -trade.quantity
        held[trade.leg] = held.get(trade.leg, Decimal(0)) + signed
    return held


async def ensure_close_plan(
    deps: ExecutionDeps, position: SyntheticPosition, log: structlog.stdlib.BoundLogger
) -> Sequence[PositionCloseLeg]:
    """The round's legs, planned once from what this position holds when it begins: the
    recorded fills, never the exchange's position (which other baskets share)."""
    round_ = position.close_round
    async with deps.sessions() as session:
        stored = await repository.get_close_plan(session, position.id, round_)
        if stored:
            return stored
        opening = await repository.get_plan(session, position.id)
        held = held_by_leg(await repository.get_trades(session, position.id))
        # What earlier rounds found the exchange no longer holding is not held either.
        for gone in await repository.get_close_plans_of(session, [position.id]):
            held[gone.leg] = held.get(gone.leg, Decimal(0)) - gone.closed_elsewhere
    values: list[dict[str, object]] = [
        {
            "position_id": position.id,
            "round": round_,
            "leg": leg.leg,
            "symbol": leg.symbol,
            "side": "Sell" if leg.side == "Buy" else "Buy",
            "quantity": held[leg.leg],
            "position_idx": leg.position_idx,
            "order_link_id": close_link_id(position.id, round_, leg.leg),
        }
        for leg in opening
        if held.get(leg.leg, Decimal(0)) > 0
    ]
    async with deps.sessions() as session:
        rows = await repository.add_close_plan(session, values)
        await repository.mark_changed(session, position.id, run_alive=True)
    log.info(
        "position.close_planned",
        close_round=round_,
        legs=[
            {"leg": r.leg, "symbol": r.symbol, "side": r.side, "qty": str(r.quantity)} for r in rows
        ],
    )
    return rows


def _round_links(plan: Sequence[PositionCloseLeg], remainders: int) -> set[str]:
    return {
        link
        for leg in plan
        for link in (leg.order_link_id, *(leg.remainder_link(n) for n in range(1, remainders + 1)))
    }


async def _recorded(
    deps: ExecutionDeps, position: SyntheticPosition, plan: Sequence[PositionCloseLeg]
) -> list[Trade]:
    """The fills of this round's orders (earlier rounds' and the opening's are not)."""
    links = _round_links(plan, deps.remainder_attempts)
    async with deps.sessions() as session:
        trades = await repository.get_trades(session, position.id)
    return [t for t in trades if t.order_link_id in links]


async def _fail_leg(
    deps: ExecutionDeps,
    run: Run,
    leg: PositionCloseLeg,
    error: RunError,
    log: structlog.stdlib.BoundLogger,
) -> None:
    """The leg could not be closed in this round: not tried again in it (`leg.failed`)."""
    assert run.close_round is not None
    legs.report_failed(log, leg, error)
    leg.error = error.message
    async with deps.sessions() as session:
        await repository.fail_close_leg(
            session, run.position.id, run.close_round, leg.leg, error.message
        )


async def _finish(
    deps: ExecutionDeps,
    run: Run,
    log: structlog.stdlib.BoundLogger,
    *,
    unfinished: str | None = None,
    refusal: str | None = None,
) -> RunResult:
    assert run.close_round is not None
    async with deps.sessions() as session:
        plan = list(await repository.get_close_plan(session, run.position.id, run.close_round))
    return await _end(
        deps,
        run.position,
        run.claim,
        run.lease,
        plan,
        log,
        unfinished=unfinished,
        refusal=refusal,
    )


async def _end(
    deps: ExecutionDeps,
    position: SyntheticPosition,
    claim: str,
    lease: RunLease,
    plan: Sequence[PositionCloseLeg],
    log: structlog.stdlib.BoundLogger,
    *,
    refusal: str | None = None,
    unfinished: str | None = None,
) -> RunResult:
    """CLOSED when every leg of the round is flat for this position; otherwise CLOSE_FAILED,
    naming each leg still held, how much, and why. `refusal`: the round could not begin."""
    closed: dict[int, Decimal] = {leg.leg: Decimal(0) for leg in plan}
    if plan:
        for trade in await _recorded(deps, position, plan):
            closed[trade.leg] += trade.quantity
    still_held = [(leg, leg.quantity - closed[leg.leg] - leg.closed_elsewhere) for leg in plan]
    still_held = [(leg, remaining) for leg, remaining in still_held if remaining > 0]
    reasons = [
        f"{leg.error or leg_message(leg, unfinished or _shortfall(leg, closed[leg.leg]))} "
        f"({remaining} {leg.symbol} still held)"
        for leg, remaining in still_held
    ]
    if refusal is not None:
        reasons.insert(0, refusal)
    new = PositionStatus.CLOSE_FAILED if reasons else PositionStatus.CLOSED
    done = await change_status(
        deps.sessions,
        position.id,
        Transition(
            PositionStatus.CLOSING,
            new,
            require_claim=claim,
            lock_pid=lease.pid,
            error="; ".join(reasons) if reasons else None,
        ),
        log=log,
    )
    if done is None:
        log.error("position.ownership_lost", error="the close was not this run's to finish")
        return RunResult(Outcome.DISCARDED, detail="ownership lost")
    if still_held:
        log.error(
            "position.close_incomplete",
            legs=[
                {
                    "leg": leg.leg,
                    "symbol": leg.symbol,
                    "side": leg.side,
                    "planned_qty": str(leg.quantity),
                    "closed_qty": str(closed[leg.leg]),
                    "held_qty": str(remaining),
                    "error": leg.error,
                }
                for leg, remaining in still_held
            ],
        )
    if new is PositionStatus.CLOSED:
        return RunResult(Outcome.CLOSED)
    return RunResult(Outcome.CLOSE_FAILED, detail="; ".join(reasons))


def _shortfall(leg: PositionCloseLeg, closed: Decimal) -> str:
    return f"closed {closed} of {leg.quantity}; the rest could not be traded"
