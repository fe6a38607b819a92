"""The aiohttp AppKeys: the state, the event set when the server begins to shut down, and the
requests being carried out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from aiohttp import web

from service.simulator.state import SimulatorState

T = TypeVar("T")
logger = logging.getLogger("service.simulator")


class InFlight:
    """Requests being carried out. Once a request has arrived it is carried out to the end,
    like on the exchange, even if its client hangs up (aiohttp's test server cancels the
    handler of a closed connection; the work runs in a task of its own, shielded)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return await asyncio.shield(task)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("simulator request failed", exc_info=task.exception())

    @property
    def count(self) -> int:
        """Requests being carried out right now."""
        return len(self._tasks)

    async def drain(self, wait_s: float = 5.0) -> None:
        """Wait for the requests still being carried out (at shutdown)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=wait_s)


STATE_KEY = web.AppKey("simulator_state", SimulatorState)
CLOSING_KEY = web.AppKey("simulator_closing", asyncio.Event)
IN_FLIGHT_KEY = web.AppKey("simulator_in_flight", InFlight)
