"""One error hierarchy every caller can classify: transient (try later) or permanent.

Each error carries the retCode, Bybit's message, the HTTP status and the request path, and
never the key, the secret or the signature. `ambiguous` says whether the request may have
taken effect on the exchange (a timeout or a dropped connection after sending): an order call
that failed ambiguously must be looked up by orderLinkId before anything is re-sent.
"""

from __future__ import annotations

from typing import ClassVar

from service.bybit import constants


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
    def reason(self) -> str:
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
    """Rate limited (retCode 10006 or HTTP 403); `retry_after` says when to try again."""


class PermanentBybitError(BybitError):
    """Will not succeed by trying again: fail the leg."""


class BybitAuthError(PermanentBybitError):
    """Invalid key, bad signature, missing permission, IP not whitelisted."""


class BybitInsufficientBalanceError(PermanentBybitError):
    pass


class DuplicateOrderLinkIdError(PermanentBybitError):
    """The orderLinkId was used before: the first attempt landed. Look it up, never fail on it."""


def error_for_retcode(
    retcode: int,
    message: str,
    *,
    path: str,
    http_status: int,
    retry_after: float | None = None,
) -> BybitError:
    kwargs = {"path": path, "retcode": retcode, "http_status": http_status}
    if retcode == constants.RETCODE_RATE_LIMIT:
        return BybitRateLimitError(message, retry_after=retry_after, **kwargs)  # type: ignore[arg-type]
    if retcode in constants.TRANSIENT_RETCODES:
        # 10000/10016 on an order may mean it was taken: resolve by lookup.
        ambiguous = retcode in (constants.RETCODE_SERVER_TIMEOUT, constants.RETCODE_BUSY)
        return TransientBybitError(message, ambiguous=ambiguous, **kwargs)  # type: ignore[arg-type]
    if retcode in constants.AUTH_RETCODES:
        return BybitAuthError(message, **kwargs)  # type: ignore[arg-type]
    if retcode in constants.INSUFFICIENT_BALANCE_RETCODES:
        return BybitInsufficientBalanceError(message, **kwargs)  # type: ignore[arg-type]
    if retcode == constants.RETCODE_DUPLICATE_ORDER_LINK_ID:
        return DuplicateOrderLinkIdError(message, **kwargs)  # type: ignore[arg-type]
    return PermanentBybitError(message, **kwargs)  # type: ignore[arg-type]
