"""What a run ends with, and the errors that end it."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum

from service.models import PlannedLeg


class Outcome(StrEnum):
    ACTIVE = "ACTIVE"
    FAILED = "FAILED"
    RETRY = "RETRY"
    DISCARDED = "DISCARDED"
    NOT_FOUND = "NOT_FOUND"
    # The run could not reach the database: nothing decided, the position is left to its
    # next attempt or the recovery sweep.
    ABORTED = "ABORTED"
    # A new basket whose account is busy with another: marked waiting, sent again when that
    # one is final (or by the recovery sweep).
    WAITING = "WAITING"
    # A close's ends: every leg flat for this position, or some still held.
    CLOSED = "CLOSED"
    CLOSE_FAILED = "CLOSE_FAILED"


@dataclass(frozen=True, slots=True)
class RunResult:
    outcome: Outcome
    retry_in: float | None = None
    detail: str | None = None


class RunError(Exception):
    """Ends the run. `leg` is the leg it happened on, if any; `message` is what the user and
    the audit log read."""

    def __init__(
        self,
        message: str,
        *,
        leg: int | None = None,
        label: str = "other",
        retcode: int | None = None,
        retry_after: float | None = None,
        pause: bool = False,
    ) -> None:
        self.message = message
        self.leg = leg
        self.metric_label = label  # a short cause for metrics: retcode_10016, fill_timeout
        self.retcode = retcode  # the exchange's retCode, when the exchange refused
        # The exchange said when to come back (an IP ban): no attempt is scheduled before.
        self.retry_after = retry_after
        # A rate limit or an IP ban, not a fault of the basket: the run waits it out without
        # using an attempt.
        self.pause = pause
        # The order it happened on, when it happened on one (the leg loop reports it).
        self.order_link_id: str | None = None
        self.qty: Decimal | None = None
        self.bybit_order_id: str | None = None  # when the exchange had given it
        # The exchange refused the order outright: it certainly placed nothing.
        self.placed_nothing = False
        super().__init__(message)


class PermanentRunError(RunError):
    """The position fails now: no further orders, nothing reversed."""


class TransientRunError(RunError):
    """The run stops; the position is tried again after the next delay."""


class OwnershipLostError(Exception):
    """The run can no longer prove it holds the position: it stops without another write."""


class CredentialsUnreadableError(Exception):
    """The stored key cannot be opened here (a worker whose CREDENTIALS_PRIVATE_KEYS lack the
    key the row is sealed for, or a legacy Fernet row and no CREDENTIALS_KEYS, say): not the
    position's fault, so nothing about it is decided."""


def leg_message(leg: PlannedLeg, message: str) -> str:
    return f"leg {leg.leg} ({leg.side} {leg.quantity} {leg.symbol}): {message}"
