"""The one way a run calls the exchange: short in-task retries (tenacity) of what may pass in
a moment, and what is left classified into the error that ends the run.

Typed through `ParamSpec`: mypy checks every call's arguments against the client's method.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import ParamSpec, TypeVar, cast

import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from service.bybit.errors import BybitError, BybitRateLimitError
from service.execution.deps import ExecutionDeps
from service.execution.outcomes import (
    PermanentRunError,
    RunError,
    TransientRunError,
    leg_message,
)
from service.models import PlannedLeg

P = ParamSpec("P")
T = TypeVar("T")
logger = structlog.stdlib.get_logger("service.execution")


async def call(
    deps: ExecutionDeps, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
) -> T:
    """A read or an idempotent write: any transient error is tried again a few times, unless
    it asks for a long wait (that is the Celery schedule's job)."""
    return await _retrying(deps, _briefly_retryable(deps), deps.call_attempts, fn, *args, **kwargs)


async def checked(
    deps: ExecutionDeps,
    action: str,
    leg: PlannedLeg | None,
    fn: Callable[P, Awaitable[T]],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """`call`, with the exchange's error that is left turned into the run's (`classify`)."""
    try:
        return await call(deps, fn, *args, **kwargs)
    except BybitError as error:
        raise classify(error, leg, action) from None


async def call_order(deps: ExecutionDeps, send: Callable[[], Awaitable[T]]) -> T:
    """Order creation: only a refusal that certainly placed nothing (the rate limit) is sent
    again here; every other failure goes through the lookup or the next run."""
    return await _retrying(deps, _rate_limited(deps), deps.rate_limit_attempts, send)


def classify(error: BybitError, leg: PlannedLeg | None, action: str) -> RunError:
    """The exchange's error as the run's: transient (the run is tried again, or waits out a
    limit without using an attempt) or permanent (the position fails)."""
    message = f"{action} failed: {error}"
    if leg is not None:
        message = leg_message(leg, message)
    number = leg.leg if leg is not None else None
    if error.transient:
        return TransientRunError(
            message,
            leg=number,
            label=error.metric_label,
            retcode=error.retcode,
            retry_after=error.retry_after,
            pause=isinstance(error, BybitRateLimitError),
        )
    return PermanentRunError(message, leg=number, label=error.metric_label, retcode=error.retcode)


async def _retrying(
    deps: ExecutionDeps,
    retry_if: Callable[[BaseException], bool],
    attempts: int,
    fn: Callable[P, Awaitable[T]],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    retrying = AsyncRetrying(
        retry=retry_if_exception(retry_if),
        stop=stop_after_attempt(attempts),
        wait=_wait_for(deps),
        before_sleep=_log_call_retry,
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await fn(*args, **kwargs)
    raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover


def _briefly_retryable(deps: ExecutionDeps) -> Callable[[BaseException], bool]:
    def predicate(error: BaseException) -> bool:
        if not isinstance(error, BybitError) or not error.transient:
            return False
        return error.retry_after is None or error.retry_after <= deps.rate_limit_wait_max

    return predicate


def _rate_limited(deps: ExecutionDeps) -> Callable[[BaseException], bool]:
    def predicate(error: BaseException) -> bool:
        return (
            isinstance(error, BybitRateLimitError)
            and error.retcode is not None
            and error.retry_after is not None
            and error.retry_after <= deps.rate_limit_wait_max
        )

    return predicate


def _log_call_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    logger.info("exchange.call_retry", attempt_number=state.attempt_number, error=str(error))


def _wait_for(deps: ExecutionDeps) -> Callable[[RetryCallState], float]:
    backoff = wait_exponential(multiplier=0.1, max=deps.call_wait_max)

    def wait(state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        delay = backoff(state)
        if isinstance(error, BybitError) and error.retry_after is not None:
            # Bybit says when the limit resets: wait that long (plus a little), not less.
            delay = max(delay, min(error.retry_after + 0.05, deps.rate_limit_wait_max))
        return delay

    return wait


async def all_of(work: Iterable[Awaitable[T]]) -> list[T]:
    """Every one to its end, side by side (none left running when one fails); then the first
    error, if any, is raised."""
    results = await asyncio.gather(*work, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return cast(list[T], results)
