"""Domain errors with messages a person can act on, and their HTTP status."""

from __future__ import annotations


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
