"""What the opening and the closing of a position share about a run: the user's key, whether
an error ends the run's tries, and scheduling the next try."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import structlog

from service.bybit.auth import ApiCredentials
from service.credentials.service import decrypt_pair
from service.execution.deps import ExecutionDeps, Run, RunLease
from service.execution.outcomes import (
    CredentialsUnreadableError,
    Outcome,
    PermanentRunError,
    RunError,
    RunResult,
    TransientRunError,
)
from service.metrics import RETRIES
from service.models import SyntheticPosition
from service.positions import repository, run_statements
from service.security import CredentialDecryptionError


async def credentials(
    deps: ExecutionDeps, lease: RunLease, position: SyntheticPosition
) -> ApiCredentials:
    """The user's key, read on the lock connection and decrypted now (kept only in the run's
    memory; a rotation of the encryption keys meanwhile changes the stored ciphertext, not
    the key itself)."""
    stored = await run_statements.stored_key(lease, position.user_id)
    if stored is None:
        raise PermanentRunError("the user has no Bybit credentials stored")
    try:
        return decrypt_pair(deps.cipher, stored.api_key_encrypted, stored.api_secret_encrypted)
    except CredentialDecryptionError as error:
        raise CredentialsUnreadableError(str(error)) from None


def pause_refunded(deps: ExecutionDeps, run: Run, error: RunError) -> bool:
    """Waiting out a rate limit or an IP ban is not an attempt, within the pause budget."""
    if not (error.pause and error.retry_after is not None):
        return False
    # Measured from when this run's work was asked for: the basket, or its close.
    began = run.position.created_at
    if run.close_round is not None and run.position.close_requested_at is not None:
        began = run.position.close_requested_at
    age = (datetime.now(UTC) - began).total_seconds()
    return age < deps.pause_budget_seconds


def ends_run(deps: ExecutionDeps, run: Run, error: RunError) -> bool:
    """Is this error the last word (permanent, or transient with no attempt left)?"""
    if isinstance(error, PermanentRunError):
        return True
    return not pause_refunded(deps, run, error) and run.retries_done >= len(deps.retry_delays)


async def schedule_retry(
    deps: ExecutionDeps,
    run: Run,
    error: TransientRunError,
    log: structlog.stdlib.BoundLogger,
    *,
    also: Sequence[TransientRunError] = (),
) -> RunResult:
    """The run stops; the claim holder runs again after the next delay (for a rate limit or
    an IP ban: when it ends, with no attempt used). The caller has checked `ends_run`.
    `also`: other legs' transient errors of the same run (a close tries every leg): each is
    reported, and none is retried before the exchange said."""
    errors = [error, *also]
    # Waiting out a limit costs no attempt only when nothing else went wrong.
    refund = all(pause_refunded(deps, run, each) for each in errors)
    if refund:
        delay = max(each.retry_after or 0.0 for each in errors)  # when the limits end
    else:
        # Never before the exchange said (an IP ban lasts ten minutes or more).
        # The last delay again if the schedule is spent (a pause that stopped being free
        # while the other legs were tried): the sweep's run limit still bounds the runs.
        delay = float(deps.retry_delays[min(run.retries_done, len(deps.retry_delays) - 1)])
    delay = max(delay, *(e.retry_after or 0.0 for e in errors))
    async with deps.sessions() as session:
        due = await repository.set_next_attempt(
            session,
            run.position.id,
            run.claim,
            delay,
            lock_pid=run.lease.pid,
            refund_attempt=refund,
        )
    for each in errors:
        RETRIES.labels(each.metric_label).inc()
        log.warning(
            "leg.retry_scheduled",
            leg=each.leg,
            error=each.message,
            retry_in_s=delay,
            next_attempt_at=due.isoformat() if due else None,
            **({"attempt_used": False} if refund else {}),
        )
    return RunResult(Outcome.RETRY, retry_in=delay, detail=error.message)
