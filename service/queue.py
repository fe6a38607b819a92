"""Publishing execute_trade_task to the broker from the event loop, without kombu or a thread.

A Celery publish through kombu is blocking I/O: from async code it needed a thread per
request, and under load that hand-off and kombu's own work were a third of the API's CPU.
Celery's Redis transport stores a message as one JSON document pushed onto the list named
after the queue, so this module builds that document itself (Celery's task protocol 2 inside
kombu's Redis envelope, exactly as `Celery.send_task` writes it for this app) and pushes it
with the process's redis.asyncio client, with a short deadline. A publish that fails leaves
the position PENDING for the recovery sweep.

tests/integration/test_task_messages.py compares the document, key for key, with the one
Celery and kombu write themselves, and runs it through a real worker: a Celery or kombu
upgrade that changes the envelope fails there, not in production.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import uuid
from typing import TYPE_CHECKING, Any, Protocol

import structlog

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from sqlalchemy.ext.asyncio import AsyncSession

EXECUTE_TRADE_TASK = "workers.trade_executor.execute_trade_task"
# A close of a position: the same run (service.execution.execute_position), named apart so
# that the queue and the logs say which it is.
CLOSE_POSITION_TASK = "workers.trade_executor.close_position_task"
# Give up quickly: the recovery sweep is the safety net, not publish retries.
PUBLISH_TIMEOUT_SECONDS = 2.0

logger = structlog.stdlib.get_logger("service.queue")

_AFTER_COMMIT = "publish_after_commit"
_HOST = socket.gethostname()
# No result backend: the reply queue is never read, but Celery always names one.
_REPLY_TO = str(uuid.uuid3(uuid.NAMESPACE_OID, f"{_HOST}-synthetic-index-trader"))


def _origin() -> str:
    """Celery's `origin` header, who sent the task (celery.utils.nodenames.anon_nodename):
    read per message, so each forked worker process names itself."""
    return f"gen{os.getpid()}@{_HOST}"


_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def publish_after_commit(session: AsyncSession, position_id: uuid.UUID) -> None:
    """Ask for execute_trade_task to be sent for `position_id` once the request's transaction
    has committed (the worker must find the row): the API's session scope sends it."""
    session.info.setdefault(_AFTER_COMMIT, []).append(position_id)


def publishes_requested(session: AsyncSession) -> list[uuid.UUID]:
    """The publishes asked for in this session's transaction, handed over once."""
    requested: list[uuid.UUID] = session.info.pop(_AFTER_COMMIT, [])
    return requested


def task_message(
    task_name: str, args: list[Any], *, task_id: str, queue: str, origin: str | None = None
) -> bytes:
    """The document Celery's Redis transport pushes for `send_task(task_name, args,
    task_id=task_id, queue=queue)`: protocol-2 headers, the body base64-encoded JSON of
    (args, kwargs, embed), and kombu's delivery properties."""
    body = json.dumps([args, {}, _EMBED])
    headers: dict[str, Any] = {
        "lang": "py",
        "task": task_name,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": repr(args),
        "kwargsrepr": "{}",
        "origin": origin or _origin(),
        "ignore_result": None,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    properties = {
        "correlation_id": task_id,
        "reply_to": _REPLY_TO,
        "delivery_mode": 2,  # persistent
        "delivery_info": {"exchange": "", "routing_key": queue},
        "priority": 0,
        "body_encoding": "base64",
        "delivery_tag": str(uuid.uuid4()),
    }
    return json.dumps(
        {
            "body": base64.b64encode(body.encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": properties,
        }
    ).encode()


def task_for(status: str) -> str:
    """The task that carries a position in `status` on: its close while CLOSING."""
    return CLOSE_POSITION_TASK if status == "CLOSING" else EXECUTE_TRADE_TASK


class TaskPublisher(Protocol):
    """Sends execute_trade_task (or `task`) for a position (RedisTaskPublisher; tests record
    instead)."""

    async def publish(
        self, position_id: uuid.UUID, *, task_id: str | None = None, task: str = ...
    ) -> None: ...


class RedisTaskPublisher:
    """Pushes execute_trade_task messages onto the Celery queue's Redis list (priority 0: the
    list has the queue's own name) with the process's redis.asyncio client."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        queue: str,
        timeout_seconds: float = PUBLISH_TIMEOUT_SECONDS,
    ) -> None:
        self._redis = redis
        self._queue = queue
        self._timeout = timeout_seconds

    async def publish(
        self,
        position_id: uuid.UUID,
        *,
        task_id: str | None = None,
        task: str = EXECUTE_TRADE_TASK,
    ) -> None:
        message = task_message(
            task,
            [str(position_id)],
            task_id=task_id or str(uuid.uuid4()),
            queue=self._queue,
        )
        async with asyncio.timeout(self._timeout):
            await self._redis.lpush(self._queue, message)

    async def try_publish(self, position_id: uuid.UUID, *, task: str = EXECUTE_TRADE_TASK) -> bool:
        """Publish, or log and report False: the position stays PENDING (or its close
        unclaimed) for the sweep."""
        try:
            await self.publish(position_id, task=task)
        except Exception as error:  # the broker's errors are many (redis, OSError, timeout)
            logger.warning(
                "position.enqueue_failed",
                position_id=str(position_id),
                error=f"{type(error).__name__}: {error}",
            )
            return False
        return True
