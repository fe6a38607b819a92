"""The API drains on SIGTERM: a request in flight is answered, then the process exits."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import new_user
from tests.support import ServiceProcess, free_port, register_key, wait_for_port

pytestmark = pytest.mark.integration


@pytest.mark.asyncio
async def test_api_answers_the_request_in_flight_then_exits(
    service_env: dict[str, str], sessions: object, tmp_path: Path
) -> None:
    port = free_port()
    api = ServiceProcess(["api", "--port", str(port)], service_env, tmp_path / "api.log")
    try:
        wait_for_port(port, api.process)
        _, token = await new_user(sessions)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        body_started = asyncio.Event()
        may_finish = asyncio.Event()
        secret = secrets.token_hex(8)
        await register_key("DRAINKEY0001", secret)  # a key the exchange knows: PUT checks it

        async def slow_body() -> AsyncIterator[bytes]:
            yield b'{"api_key": "DRAINKEY0001", '
            body_started.set()
            await may_finish.wait()
            yield b'"api_secret": "' + secret.encode() + b'"}'

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as http:
            request = asyncio.create_task(
                http.put("/api/credentials", content=slow_body(), headers=headers)
            )
            await asyncio.wait_for(body_started.wait(), 10)
            await asyncio.sleep(0.2)  # let the server read the first chunk
            api.process.send_signal(15)  # SIGTERM to the server, mid-request
            await asyncio.sleep(0.3)
            may_finish.set()
            response = await request
        assert response.status_code == 200, response.text
        # uvicorn shuts down cleanly, then re-raises SIGTERM so supervisors see why it ended.
        assert api.process.wait(timeout=20) in (0, -15)
        assert '"Finished server process' in api.output()
    finally:
        api.stop()
