"""execute_trade_task and close_position_task: thin Celery adapters over
service.execution.execute_position, which opens a position or, while it is CLOSING, closes
it (the position's status decides; the two names say in the queue and the logs which the
sender meant)."""

from __future__ import annotations

import uuid

import structlog
from celery import Task
from celery.signals import worker_process_shutdown, worker_shutdown

from celery_app import app
from service.config import get_settings
from service.execution import Outcome, execute_position
from service.queue import CLOSE_POSITION_TASK, EXECUTE_TRADE_TASK
from workers.runtime import WorkerRuntime

logger = structlog.stdlib.get_logger("workers.trade_executor")

runtime = WorkerRuntime(get_settings())


@app.task(bind=True, name=EXECUTE_TRADE_TASK, max_retries=None)
def execute_trade_task(self: Task[[str], str], position_id: str) -> str:
    return _run(self, position_id)


@app.task(bind=True, name=CLOSE_POSITION_TASK, max_retries=None)
def close_position_task(self: Task[[str], str], position_id: str) -> str:
    return _run(self, position_id)


def _run(self: Task[[str], str], position_id: str) -> str:
    try:
        parsed = uuid.UUID(position_id)
    except (ValueError, TypeError, AttributeError):
        logger.error("position.invalid_id", position_id=repr(position_id))
        return Outcome.NOT_FOUND.value
    task_id = str(self.request.id)
    result = runtime.run(
        lambda r, deadline: execute_position(r.deps, parsed, task_id=task_id, deadline=deadline)
    )
    if result.outcome is Outcome.RETRY and result.retry_in is not None:
        # Same task id on the new message: the claim holder continues after the countdown.
        raise self.retry(countdown=result.retry_in, max_retries=None)
    return result.outcome.value


@worker_process_shutdown.connect
@worker_shutdown.connect
def _close_runtime(**_: object) -> None:
    runtime.close()
