from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from tests.unit.simulator_support import Simulator, running_simulator


@pytest_asyncio.fixture
async def simulator() -> AsyncIterator[Simulator]:
    async with running_simulator() as simulator:
        yield simulator
