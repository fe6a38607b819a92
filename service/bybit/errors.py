"""One error hierarchy every caller can classify: transient (try later) or permanent.

Each error carries the retCode, Bybit's message, the HTTP status and the request path, and
never the key, the secret or the signature. `ambiguous` says whether the request may have
taken effect on the exchange (a timeout or a dropped connection after sending): an order call
that failed ambiguously must be looked up by orderLinkId before anything is re-sent.
"""

from __future__ import annotations

import re
from typing import ClassVar

from service.bybit.retcodes import Cause, Handling, lookup


class BybitError(Exception):
    transient: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        path: str,
        retcode: int | None = None,
        http_status: int | None = None,
        ambiguous: bool = False,
        retry_after: float | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.retcode = retcode
        self.http_status = http_status
        self.ambiguous = ambiguous
        self.retry_after = retry_after
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [self.message, f"path={self.path}"]
        if self.retcode is not None:
            parts.append(f"retCode={self.retcode}")
        if self.http_status is not None:
            parts.append(f"http={self.http_status}")
        return " ".join(parts)

    @property
    def metric_label(self) -> str:
        """A short machine-friendly label (for logs and metrics)."""
        if self.retcode is not None:
            return f"retcode_{self.retcode}"
        if self.http_status is not None:
            return f"http_{self.http_status}"
        return type(self).__name__


class TransientBybitError(BybitError):
    """May succeed later: network trouble, timeouts, 5xx, busy and rate-limit answers."""

    transient = True


class BybitNetworkError(TransientBybitError):
    """Connection refused or reset, or a timeout."""


class BybitServerError(TransientBybitError):
    """HTTP 5xx or 429, or a body that is not the JSON envelope."""


class BybitRateLimitError(TransientBybitError):
    """Rate limited (retCode 10006, or our own limiter); `retry_after` says when to try
    again. Nothing was placed."""


class BybitIpBanError(BybitRateLimitError):
    """The address breached Bybit's IP limit (HTTP 403, retCode 10018): every call from it
    waits until the ban ends (`retry_after`, ten minutes or more)."""


class BybitClockError(TransientBybitError):
    """The request's timestamp was outside Bybit's window (retCode 10002): nothing was done;
    the clock's offset is measured again and the request signed anew."""


class PermanentBybitError(BybitError):
    """Will not succeed by trying again: fail the leg."""


class BybitAuthError(PermanentBybitError):
    """Invalid key, bad signature, missing permission, IP not whitelisted."""


class BybitInsufficientBalanceError(PermanentBybitError):
    pass


class DuplicateOrderLinkIdError(PermanentBybitError):
    """The orderLinkId was used before: the first attempt landed. Look it up, never fail on it."""


class UnknownRetCodeError(PermanentBybitError):
    """A retCode Bybit does not document: never success. An order that got it is looked up
    (`ambiguous`) before the leg fails with the code."""


# Bybit's message for a bad signature (10004) echoes the string it signed:
# `error sign! origin_string[<timestamp><API key><recvWindow><query or body>]`. Everything
# from the marker on is dropped (the body may itself hold brackets).
_ECHOED_REQUEST = re.compile(r"origin_?string\b.*", re.IGNORECASE | re.DOTALL)
# Longer than any message Bybit documents: the rest is cut (whatever else it may echo).
MAX_MESSAGE_CHARS = 300


def safe_message(message: str) -> str:
    """Bybit's retMsg without the request material it can echo (the API key with it), so
    the error can be logged and stored: `origin_string[...]` replaced, the length bounded."""
    cleaned = _ECHOED_REQUEST.sub("origin_string[redacted]", message)
    if len(cleaned) > MAX_MESSAGE_CHARS:
        cleaned = cleaned[:MAX_MESSAGE_CHARS] + "..."
    return cleaned


def error_for_retcode(
    retcode: int,
    message: str,
    *,
    path: str,
    http_status: int,
    retry_after: float | None = None,
    ban_seconds: float = 600.0,
) -> BybitError:
    """The error for a non-zero retCode, by its row in retcodes.RETCODES. `message` is
    Bybit's retMsg (or a batch item's msg), kept without what it echoes of the request."""
    message = safe_message(message)
    row = lookup(retcode)
    kwargs = {"path": path, "retcode": retcode, "http_status": http_status}
    match row.handling:
        case Handling.RATE_LIMITED:
            return BybitRateLimitError(message, retry_after=retry_after, **kwargs)  # type: ignore[arg-type]
        case Handling.IP_BANNED:
            return BybitIpBanError(message, retry_after=ban_seconds, **kwargs)  # type: ignore[arg-type]
        case Handling.CLOCK:
            return BybitClockError(message, **kwargs)  # type: ignore[arg-type]
        case Handling.TRANSIENT:
            return TransientBybitError(message, **kwargs)  # type: ignore[arg-type]
        case Handling.AMBIGUOUS:
            return TransientBybitError(message, ambiguous=True, **kwargs)  # type: ignore[arg-type]
        case Handling.DUPLICATE:
            return DuplicateOrderLinkIdError(message, **kwargs)  # type: ignore[arg-type]
        case Handling.UNKNOWN:
            return UnknownRetCodeError(
                f"{message} (a retCode Bybit does not document)",
                ambiguous=True,
                **kwargs,  # type: ignore[arg-type]
            )
    if row.cause is Cause.AUTH:
        return BybitAuthError(message, **kwargs)  # type: ignore[arg-type]
    if row.cause is Cause.BALANCE:
        return BybitInsufficientBalanceError(message, **kwargs)  # type: ignore[arg-type]
    # PERMANENT, and NOT_MODIFIED outside set-leverage (which reads it as success).
    return PermanentBybitError(message, **kwargs)  # type: ignore[arg-type]
