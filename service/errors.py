"""Domain errors with messages a person can act on, and their HTTP status."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorOut(BaseModel):
    """Every error answer: `detail` is a message, or for a malformed body the list of fields."""

    detail: str | list[dict[str, Any]] = Field(
        examples=["unknown index 'NOPE'; known indices: BLUECHIP, TOP10"]
    )


def error_responses(**described: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the given status codes (`r401="..."`), all with ErrorOut."""
    return {
        int(code.removeprefix("r")): {"model": ErrorOut, "description": text}
        for code, text in described.items()
    }


class DomainError(Exception):
    status_code = 400

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class NotFoundError(DomainError):
    status_code = 404


class AuthenticationError(DomainError):
    status_code = 401


class ValidationError(DomainError):
    status_code = 422


class ConflictError(DomainError):
    status_code = 409


class ServiceUnavailableError(DomainError):
    status_code = 503


class TooManyRequestsError(DomainError):
    """A budget of the caller is used up (service/budgets.py): 429 with Retry-After."""

    status_code = 429

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, retry_after)  # whole seconds, at least 1


class ExchangeUnavailableError(ServiceUnavailableError):
    """The exchange could not be asked now (unreachable, busy, or our shared limiter says
    wait): 503, with Retry-After when the wait is known."""

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
