"""The task messages the API pushes itself (service/queue.py, no kombu): the same document
Celery writes, and run by a real worker with their task id, queue, retries and late ack.

If a Celery or kombu upgrade changes the envelope, the first test fails here instead of the
workers dropping or misreading the API's messages in production.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from celery_app import app as celery_app
from service.config import get_settings
from service.models import SyntheticPosition
from service.queue import EXECUTE_TRADE_TASK, RedisTaskPublisher
from tests.conftest import TEST_ENV
from tests.integration.conftest import api_client, start_worker
from tests.support import ApiUser, eventually

pytestmark = pytest.mark.integration

# kombu's Redis transport keeps a fetched, not yet acknowledged message in this hash, under
# its delivery tag, until the worker acknowledges it.
UNACKED = "unacked"


@pytest.fixture
def broker(redis: aioredis.Redis) -> aioredis.Redis:
    """The broker's Redis (the tests' own database)."""
    return redis


def _comparable(raw: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """The message without what differs by design between two sends (a fresh delivery tag,
    the sending process's name and reply queue), and those parts, checked for their form."""
    message = json.loads(raw)
    varying = {
        "delivery_tag": message["properties"].pop("delivery_tag"),
        "reply_to": message["properties"].pop("reply_to"),
        "origin": message["headers"].pop("origin"),
    }
    uuid.UUID(varying["delivery_tag"])
    uuid.UUID(varying["reply_to"])
    assert re.fullmatch(r"gen\d+@\S+", varying["origin"]), varying["origin"]
    return message, varying


@pytest.mark.asyncio
async def test_the_api_s_message_is_the_document_celery_writes(broker: aioredis.Redis) -> None:
    queue = f"envelope-{secrets.token_hex(4)}"
    task_id, position_id = str(uuid.uuid4()), uuid.uuid4()
    try:
        await asyncio.to_thread(
            celery_app.send_task,
            EXECUTE_TRADE_TASK,
            args=[str(position_id)],
            task_id=task_id,
            queue=queue,
        )
        # Celery pushed onto the list named after the queue: where the API pushes.
        assert await broker.llen(queue) == 1
        theirs, _ = _comparable(await broker.rpop(queue))
        await RedisTaskPublisher(broker, queue=queue).publish(position_id, task_id=task_id)
        assert await broker.llen(queue) == 1
        ours, _ = _comparable(await broker.rpop(queue))
        assert ours == theirs
        body = json.loads(base64.b64decode(ours["body"]))
        assert body[0] == [str(position_id)]
        assert ours["headers"]["id"] == ours["headers"]["root_id"] == task_id
        assert ours["properties"]["delivery_info"] == {"exchange": "", "routing_key": queue}
    finally:
        async for key in broker.scan_iter(match=f"*{queue}*"):
            await broker.delete(key)


async def _message_of(broker: aioredis.Redis, queue: str, position_id: str) -> dict[str, Any]:
    for raw in await broker.lrange(queue, 0, -1):
        message: dict[str, Any] = json.loads(raw)
        if json.loads(base64.b64decode(message["body"]))[0] == [position_id]:
            return message
    raise AssertionError(f"no message for {position_id} on {queue}")


@pytest.mark.asyncio
async def test_a_real_worker_runs_the_api_s_message_with_its_id_retries_and_late_ack(
    funded_user: ApiUser,
    sim: httpx.AsyncClient,
    sessions: Any,
    service_env: dict[str, str],
    tmp_path: Path,
    broker: aioredis.Redis,
) -> None:
    queue = TEST_ENV["CELERY_QUEUE"]
    async with api_client(get_settings()) as api:
        stored = await api.put(
            "/api/credentials",
            json={"api_key": funded_user.api_key, "api_secret": funded_user.api_secret},
            headers=funded_user.headers,
        )
        assert stored.status_code == 200
        # No worker yet: the message the API pushed waits on the queue to be read.
        created = await api.post(
            "/api/positions",
            json={"index": "BLUECHIP", "size": "2000", "direction": "long"},
            headers=funded_user.headers,
        )
        assert created.status_code == 202, created.text
        position_id = created.json()["id"]
        message = await _message_of(broker, queue, position_id)
        task_id, tag = message["headers"]["id"], message["properties"]["delivery_tag"]

        # A 502 on the first order (outcome unknown, looked up, absent: a Celery retry after
        # 0.2 s), and slow answers, so the run is long enough to be watched.
        await sim.post(
            "/sim/faults",
            json={
                "api_key": funded_user.api_key,
                "path": "/v5/order/create",
                "kind": "http_status",
                "status": 502,
                "times": 1,
            },
        )
        await sim.put("/sim/config", json={"latency_ms": 150})
        worker = start_worker(service_env, tmp_path)
        try:
            # acks_late: the message is still unacknowledged while the run it started trades.
            async def held_while_executing() -> bool:
                status = (
                    await api.get(f"/api/positions/{position_id}", headers=funded_user.headers)
                ).json()["status"]
                return status == "EXECUTING" and bool(await broker.hexists(UNACKED, tag))

            await eventually(
                held_while_executing,
                timeout=60,
                interval=0.02,
                message="the message unacknowledged while its run executes",
            )

            async def final() -> dict[str, Any] | None:
                body: dict[str, Any] = (
                    await api.get(f"/api/positions/{position_id}", headers=funded_user.headers)
                ).json()
                return body if body["status"] in ("ACTIVE", "FAILED") else None

            body = await eventually(final, timeout=90, interval=0.1, message="a final status")
            assert body["status"] == "ACTIVE", body["error"]
            assert body["attempts"] == 2  # the first run and one Celery retry
            # Acknowledged once the task returned; nothing of it is left on the queue.
            await eventually(
                lambda: _gone(broker, queue, tag, position_id),
                timeout=10,
                message="the message acknowledged",
            )
        finally:
            await sim.put("/sim/config", json={"latency_ms": 0})
            worker.stop()
    events = [json.loads(line) for line in worker.output().splitlines() if line.startswith("{")]
    mine = [e for e in events if e.get("position_id") == position_id]
    # Both runs (the first and the retry) carried the task id the API gave the message.
    assert {e.get("task_id") for e in mine if "task_id" in e} == {task_id}
    assert [e["retry_in_s"] for e in mine if e["event"] == "leg.retry_scheduled"] == [0.2]
    async with sessions() as session:
        row = await session.get(SyntheticPosition, uuid.UUID(position_id))
    assert row is not None
    assert row.claim == task_id


async def _gone(broker: aioredis.Redis, queue: str, tag: str, position_id: str) -> bool:
    if await broker.hexists(UNACKED, tag):
        return False
    try:
        await _message_of(broker, queue, position_id)
    except AssertionError:
        return True
    return False
