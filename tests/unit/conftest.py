from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest_asyncio
from aiohttp.test_utils import TestServer

from service.simulator import SimulatorState, create_app
from tests.unit.simulator_support import KEY, SECRET, Simulator


@pytest_asyncio.fixture
async def simulator() -> AsyncIterator[Simulator]:
    state = SimulatorState()
    server = TestServer(create_app(state), host="127.0.0.1")
    await server.start_server()
    async with aiohttp.ClientSession() as http:
        sim = Simulator(state=state, url=str(server.make_url("")).rstrip("/"), http=http)
        await sim.admin(
            "POST", "/sim/accounts", {"api_key": KEY, "api_secret": SECRET, "balance": "100000"}
        )
        yield sim
    await server.close()
