"""Publishing execute_trade_task to the broker, without blocking the event loop.

Celery's publish is blocking I/O with its own retries; from async code it runs in a thread
with a bounded retry policy, so an unreachable Redis costs a request a second or two, not
the whole loop. A publish that fails leaves the position PENDING for the recovery sweep.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Protocol

import structlog

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy.ext.asyncio import AsyncSession

EXECUTE_TRADE_TASK = "workers.trade_executor.execute_trade_task"

logger = structlog.stdlib.get_logger("service.queue")

# Give up quickly: the recovery sweep is the safety net, not publish retries.
_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.5}


_AFTER_COMMIT = "publish_after_commit"


def publish_after_commit(session: AsyncSession, position_id: uuid.UUID) -> None:
    """Ask for execute_trade_task to be sent for `position_id` once the request's transaction
    has committed (the worker must find the row): the API's session scope sends it."""
    session.info.setdefault(_AFTER_COMMIT, []).append(position_id)


def publishes_requested(session: AsyncSession) -> list[uuid.UUID]:
    """The publishes asked for in this session's transaction, handed over once."""
    requested: list[uuid.UUID] = session.info.pop(_AFTER_COMMIT, [])
    return requested


class TaskPublisher(Protocol):
    """Sends execute_trade_task for a position (CeleryPublisher; tests record instead)."""

    async def publish(self, position_id: uuid.UUID, *, task_id: str | None = None) -> None: ...


class CeleryPublisher:
    def __init__(self, app: Celery, *, queue: str) -> None:
        self._app = app
        self._queue = queue

    async def publish(self, position_id: uuid.UUID, *, task_id: str | None = None) -> None:
        await asyncio.to_thread(self._send, position_id, task_id)

    def _send(self, position_id: uuid.UUID, task_id: str | None) -> None:
        self._app.send_task(
            EXECUTE_TRADE_TASK,
            args=[str(position_id)],
            task_id=task_id,
            queue=self._queue,
            retry=True,
            retry_policy=_RETRY_POLICY,
        )

    async def try_publish(self, position_id: uuid.UUID) -> bool:
        """Publish, or log and report False: the position stays PENDING for the sweep."""
        try:
            await self.publish(position_id)
        except Exception as error:  # the broker's errors are many (kombu, redis, OSError)
            logger.warning(
                "position.enqueue_failed",
                position_id=str(position_id),
                error=f"{type(error).__name__}: {error}",
            )
            return False
        return True
