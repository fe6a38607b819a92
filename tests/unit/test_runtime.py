"""The worker runtime leaves nothing of one task on the loop it reuses for the next.

Celery's soft time limit is raised by billiard from a signal handler in the pool process's
main thread; here a real SIGALRM handler raises billiard's own exception the same way, while
the run awaits, so it leaves `run_until_complete` exactly as in a worker.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from billiard.exceptions import SoftTimeLimitExceeded

from service.config import Settings
from workers.runtime import RunOverranError, WorkerRuntime


class _Probe:
    """What the work did: whether its clean-up ran, and whether it ever went on."""

    def __init__(self) -> None:
        self.cleaned_up = 0
        self.resumed_after_interrupt = False
        self.deadlines: list[float] = []


class _NoResources:
    async def close(self) -> None:
        pass


async def _no_resources(_: Settings) -> Any:
    return _NoResources()


@pytest.fixture
def runtime() -> Iterator[WorkerRuntime]:
    # A 2 s hard limit: the run's deadline at 1.5 s, then 0.1 s of grace.
    settings = Settings(task_time_limit_seconds=2)
    runtime = WorkerRuntime(settings, open_resources=_no_resources)
    yield runtime
    runtime.close()


def _soft_limit_in(seconds: float) -> None:
    def raise_soft_limit(signum: int, frame: object) -> None:
        raise SoftTimeLimitExceeded()

    signal.signal(signal.SIGALRM, raise_soft_limit)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def test_a_soft_time_limit_cancels_the_run_before_the_next_task(runtime: WorkerRuntime) -> None:
    probe = _Probe()

    async def slow_run(_: Any, deadline: float) -> str:
        try:
            await asyncio.sleep(1.0)  # awaiting the exchange, say
            probe.resumed_after_interrupt = True
            return "finished"
        finally:
            probe.cleaned_up += 1  # releasing the run's locks, say

    _soft_limit_in(0.2)
    try:
        with pytest.raises(SoftTimeLimitExceeded):
            runtime.run(slow_run)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    # Cancelled and drained before run() returned: clean-up done, no task left on the loop.
    assert probe.cleaned_up == 1

    async def next_task(_: Any, deadline: float) -> int:
        await asyncio.sleep(1.2)  # long enough for the old run to wake, were it pending
        return len(asyncio.all_tasks())

    assert runtime.run(next_task) == 1  # only itself
    assert not probe.resumed_after_interrupt


def test_a_run_past_its_deadline_and_grace_is_cancelled(runtime: WorkerRuntime) -> None:
    probe = _Probe()

    async def stubborn_run(_: Any, deadline: float) -> None:
        probe.deadlines.append(deadline - asyncio.get_running_loop().time())
        try:
            await asyncio.sleep(10)  # ignores its deadline
            probe.resumed_after_interrupt = True
        finally:
            probe.cleaned_up += 1

    with pytest.raises(RunOverranError, match=r"cancelled 0\.1 s after its deadline"):
        runtime.run(stubborn_run)
    assert probe.cleaned_up == 1
    assert not probe.resumed_after_interrupt
    assert 1.4 < probe.deadlines[0] <= 1.5  # the deadline handed to the work


def test_tasks_a_run_leaves_behind_are_cancelled_with_it(runtime: WorkerRuntime) -> None:
    probe = _Probe()

    async def background() -> None:
        try:
            await asyncio.sleep(5)
            probe.resumed_after_interrupt = True
        finally:
            probe.cleaned_up += 1

    async def careless_run(_: Any, deadline: float) -> str:
        asyncio.get_running_loop().create_task(background())
        await asyncio.sleep(0)
        return "done"

    assert runtime.run(careless_run) == "done"
    assert probe.cleaned_up == 1

    async def count(_: Any, deadline: float) -> int:
        return len(asyncio.all_tasks())

    assert runtime.run(count) == 1
    assert not probe.resumed_after_interrupt
