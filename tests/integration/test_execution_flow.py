"""The execution flow awaited directly (no Celery), with the real database."""

from __future__ import annotations

import uuid
from dataclasses import replace
from decimal import Decimal

import pytest

from service.db import SessionScope
from service.execution import ExecutionDeps, Outcome, execute_position
from service.models import PositionStatus, SyntheticPosition
from service.positions import repository
from service.trading_logic import Direction
from tests.integration.conftest import pending_position
from tests.support import foreign_sealer

pytestmark = [pytest.mark.integration]


@pytest.mark.asyncio
async def test_transient_errors_retry_on_schedule_then_fail(
    unreachable_deps: ExecutionDeps, sessions: SessionScope
) -> None:
    position_id = await pending_position(sessions, unreachable_deps.cipher)
    outcomes = [
        await execute_position(unreachable_deps, position_id, task_id="task-1") for _ in range(4)
    ]
    assert [o.outcome for o in outcomes] == [Outcome.RETRY] * 3 + [Outcome.FAILED]
    assert [o.retry_in for o in outcomes[:3]] == [0.0, 0.0, 0.0]
    async with sessions() as session:
        position = await repository.get_position(session, position_id)
    assert position is not None
    assert position.status == PositionStatus.FAILED
    assert position.attempts == 4
    assert position.error is not None
    assert position.error.startswith("gave up after 4 attempts")


@pytest.mark.asyncio
async def test_only_the_claim_holder_continues(
    unreachable_deps: ExecutionDeps, sessions: SessionScope
) -> None:
    position_id = await pending_position(sessions, unreachable_deps.cipher)
    first = await execute_position(unreachable_deps, position_id, task_id="holder")
    assert first.outcome is Outcome.RETRY
    stranger = await execute_position(unreachable_deps, position_id, task_id="someone-else")
    assert stranger.outcome is Outcome.DISCARDED
    missing = await execute_position(unreachable_deps, uuid.uuid4(), task_id="x")
    assert missing.outcome is Outcome.NOT_FOUND
    async with sessions() as session:
        position = await session.get(SyntheticPosition, position_id)
    assert position is not None
    assert position.claim == "holder"
    assert position.attempts == 1


@pytest.mark.asyncio
async def test_a_second_copy_is_discarded_while_the_first_holds_the_lock(
    unreachable_deps: ExecutionDeps, sessions: SessionScope
) -> None:
    position_id = await pending_position(sessions, unreachable_deps.cipher)
    async with unreachable_deps.run_lock(position_id) as held:
        assert held
        copy = await execute_position(unreachable_deps, position_id, task_id="dup")
    assert copy.outcome is Outcome.DISCARDED
    assert copy.detail == "locked"


class _RecordingPublisher:
    """Collects what the sweep would send (the broker itself is tested elsewhere)."""

    def __init__(self) -> None:
        self.sent: list[tuple[uuid.UUID, str | None]] = []

    async def publish(
        self, position_id: uuid.UUID, *, task_id: str | None = None, task: str = ""
    ) -> None:
        self.sent.append((position_id, task_id))


@pytest.mark.asyncio
async def test_recovery_resumes_dead_runs_but_not_positions_waiting_for_a_retry(
    unreachable_deps: ExecutionDeps, sessions: SessionScope
) -> None:
    from sqlalchemy import text

    from service.execution.recovery import recover_stale_positions

    waiting = await pending_position(sessions, unreachable_deps.cipher)
    dead = await pending_position(sessions, unreachable_deps.cipher)
    for position_id, claim in ((waiting, "waiting-task"), (dead, "dead-task")):
        result = await execute_position(unreachable_deps, position_id, task_id=claim)
        assert result.outcome is Outcome.RETRY
    async with sessions() as session:
        # Both look silent for a minute; only `waiting` has its next attempt still ahead.
        await session.execute(
            text(
                "UPDATE synthetic_positions SET heartbeat_at = now() - interval '60 seconds', "
                "next_attempt_at = CASE WHEN id = :waiting THEN now() + interval '5 minutes' "
                "ELSE now() - interval '60 seconds' END WHERE id IN (:waiting, :dead)"
            ),
            {"waiting": waiting, "dead": dead},
        )
    publisher = _RecordingPublisher()
    async with unreachable_deps.run_lock(dead) as held:
        assert held
        # A live run (it holds the lock) is never resumed, however silent.
        report = await recover_stale_positions(
            sessions, publisher, stale_pending_seconds=30, stale_executing_seconds=30, max_runs=5
        )
        assert dead not in report.resumed_executing
    report = await recover_stale_positions(
        sessions, publisher, stale_pending_seconds=30, stale_executing_seconds=30, max_runs=5
    )
    assert dead in report.resumed_executing
    assert waiting not in report.resumed_executing
    assert (dead, "dead-task") in publisher.sent  # resumed under its claim
    assert all(position_id != waiting for position_id, _ in publisher.sent)


@pytest.mark.asyncio
async def test_the_sweep_s_failure_write_is_fenced_by_the_run_lock(
    unreachable_deps: ExecutionDeps, sessions: SessionScope
) -> None:
    """The sweep looks (no run alive) and then writes: a run that took the lock in between
    keeps the position; the write itself carries the condition."""
    from service.positions.status import Transition, change_status

    position_id = await pending_position(sessions, unreachable_deps.cipher)
    result = await execute_position(unreachable_deps, position_id, task_id="claimed")
    assert result.outcome is Outcome.RETRY
    give_up = Transition(
        PositionStatus.EXECUTING,
        PositionStatus.FAILED,
        require_claim="claimed",
        require_no_run=True,
        error="gave up",
    )
    async with unreachable_deps.run_lock(position_id) as held:
        assert held
        assert await change_status(sessions, position_id, give_up) is None
    failed = await change_status(sessions, position_id, give_up)
    assert failed is not None
    assert failed.status == PositionStatus.FAILED


async def _second_position(sessions: SessionScope, first: uuid.UUID) -> uuid.UUID:
    """Another basket of the same user (the same exchange account)."""
    async with sessions() as session:
        owner = await session.get(SyntheticPosition, first)
        assert owner is not None
        position = await repository.add_position(
            session,
            user_id=owner.user_id,
            index_code="BLUECHIP",
            size=Decimal(1000),
            direction=Direction.LONG.value,
        )
        assert position is not None
        return position.id


@pytest.mark.asyncio
async def test_a_basket_holds_its_account_until_it_is_final(
    unreachable_deps: ExecutionDeps, sessions: SessionScope
) -> None:
    first = await pending_position(sessions, unreachable_deps.cipher)
    second = await _second_position(sessions, first)
    other_account = await pending_position(sessions, unreachable_deps.cipher)

    began = await execute_position(unreachable_deps, first, task_id="first")
    assert began.outcome is Outcome.RETRY  # EXECUTING, between two attempts

    # The same account's next basket waits (no attempt used, shown on the position)...
    waiting = await execute_position(unreachable_deps, second, task_id="second")
    assert waiting.outcome is Outcome.WAITING  # no retry message: nothing polls
    assert waiting.detail == "waiting for the account"
    async with sessions() as session:
        waited = await repository.get_position(session, second)
    assert waited is not None
    assert waited.status == PositionStatus.PENDING
    assert waited.attempts == 0
    assert waited.account_wait_since is not None

    # ...another account's does not.
    unaffected = await execute_position(unreachable_deps, other_account, task_id="other")
    assert unaffected.outcome is Outcome.RETRY
    assert unaffected.detail != "waiting for the account"

    # Once the first basket is final, it sends the second one, which runs.
    publisher = _RecordingPublisher()
    handing = replace(unreachable_deps, publisher=publisher)
    outcomes = [await execute_position(handing, first, task_id="first") for _ in range(3)]
    assert outcomes[-1].outcome is Outcome.FAILED
    assert publisher.sent == [(second, None)]
    runs = await execute_position(unreachable_deps, second, task_id="second")
    assert runs.detail != "waiting for the account"
    async with sessions() as session:
        claimed = await repository.get_position(session, second)
    assert claimed is not None
    assert claimed.status == PositionStatus.EXECUTING
    assert claimed.attempts == 1
    assert claimed.account_wait_since is None


@pytest.mark.asyncio
async def test_a_new_basket_that_waited_too_long_fails_with_nothing_sent(
    unreachable_deps: ExecutionDeps, sessions: SessionScope
) -> None:
    first = await pending_position(sessions, unreachable_deps.cipher)
    second = await _second_position(sessions, first)
    assert (await execute_position(unreachable_deps, first, task_id="a")).outcome is Outcome.RETRY
    impatient = replace(unreachable_deps, account_wait_limit_seconds=0.0)
    result = await execute_position(impatient, second, task_id="b")
    assert result.outcome is Outcome.FAILED
    assert result.detail is not None
    assert result.detail.endswith("no order was sent")
    async with sessions() as session:
        failed = await repository.get_position(session, second)
    assert failed is not None
    assert failed.status == PositionStatus.FAILED
    assert failed.account_wait_since is None  # GET no longer says it waits


@pytest.mark.asyncio
async def test_status_writes_need_the_run_lock_s_own_connection(
    unreachable_deps: ExecutionDeps, sessions: SessionScope
) -> None:
    position_id = await pending_position(sessions, unreachable_deps.cipher)
    async with unreachable_deps.run_lock(position_id) as lease:
        assert lease is not None
        async with sessions() as session:
            stranger = await repository.compare_and_set_status(
                session,
                position_id,
                expected=PositionStatus.PENDING,
                new=PositionStatus.EXECUTING,
                claim="t",
                lock_pid=lease.pid + 1,  # not the connection holding the lock
            )
            assert stranger is None
            holder = await repository.compare_and_set_status(
                session,
                position_id,
                expected=PositionStatus.PENDING,
                new=PositionStatus.EXECUTING,
                claim="t",
                lock_pid=lease.pid,
            )
            assert holder is not None
        pid = lease.pid
    # The lock released (as when its connection dies): the run can no longer write.
    async with sessions() as session:
        late = await repository.compare_and_set_status(
            session,
            position_id,
            expected=PositionStatus.EXECUTING,
            new=PositionStatus.FAILED,
            require_claim="t",
            lock_pid=pid,
            error="late",
        )
    assert late is None


@pytest.mark.asyncio
async def test_a_key_this_worker_cannot_read_is_left_for_another_then_fails_the_new_basket(
    unreachable_deps: ExecutionDeps, sessions: SessionScope
) -> None:
    from sqlalchemy import text

    # Sealed for a key this worker does not have (a rotation half rolled out, say).
    other = foreign_sealer()
    position_id = await pending_position(sessions, other)
    fresh = await execute_position(unreachable_deps, position_id, task_id="k")
    assert fresh.outcome is Outcome.ABORTED  # left as it was, for a worker that can read it
    async with sessions() as session:
        await session.execute(
            text(
                "UPDATE synthetic_positions SET created_at = now() - interval '1 hour' "
                "WHERE id = :id"
            ),
            {"id": position_id},
        )
    old = await execute_position(unreachable_deps, position_id, task_id="k")
    assert old.outcome is Outcome.FAILED
    assert old.detail is not None
    assert "PUT /api/credentials" in old.detail
