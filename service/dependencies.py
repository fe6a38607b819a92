"""FastAPI dependencies: the request's session, the caller, the app's shared objects.

All are `async def`: FastAPI runs a plain `def` dependency in its thread pool, a thread
hand-off on every request for what is an attribute read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy.ext.asyncio import AsyncSession

from service.budgets import Budgets
from service.indices.cache import IndexCache
from service.models import User
from service.queue import RedisTaskPublisher, publishes_requested
from service.security import CredentialSealer
from service.users.service import authenticate

_bearer = HTTPBearer(
    auto_error=False, description="the token from `python -m service users create`"
)


@asynccontextmanager
async def request_transaction(request: Request) -> AsyncIterator[AsyncSession]:
    """The request's transaction: committed when the block ends without error, rolled back
    when it raises; the task publishes asked for in it (`queue.publish_after_commit`) are
    sent after the commit. No endpoint commits."""
    async with request.app.state.session_factory() as session:
        yield session
        await session.commit()
        publisher: RedisTaskPublisher = request.app.state.publisher
        for position_id in publishes_requested(session):
            # If this publish is lost, the recovery sweep re-sends the PENDING position.
            await publisher.try_publish(position_id)


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """`request_transaction` as a dependency: committed before the response is sent
    (`scope="function"`)."""
    async with request_transaction(request) as session:
        yield session


Session = Annotated[AsyncSession, Depends(get_session, scope="function")]
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def bearer_token(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return credentials.credentials if credentials else None


def request_bearer_token(request: Request) -> str | None:
    """The bearer token as `_bearer` reads it, straight from the header: for the hot paths,
    where resolving a security dependency per request costs more than the rest of a 304.
    Their routes declare the scheme with `BEARER_SECURITY` instead, so the OpenAPI schema
    still says they need the token."""
    scheme, token = get_authorization_scheme_param(request.headers.get("Authorization"))
    return token if scheme.lower() == "bearer" and token else None


BEARER_SECURITY: dict[str, Any] = {"security": [{_bearer.scheme_name: []}]}


async def get_current_user(session: Session, credentials: Bearer) -> User:
    return await authenticate(session, bearer_token(credentials))


CurrentUser = Annotated[User, Depends(get_current_user)]


async def get_cipher(request: Request) -> CredentialSealer:
    # The API's sealer: it seals a user's key and cannot open anything stored.
    cipher: CredentialSealer = request.app.state.cipher
    return cipher


async def get_index_cache(request: Request) -> IndexCache:
    indices: IndexCache = request.app.state.index_cache
    return indices


Indices = Annotated[IndexCache, Depends(get_index_cache)]
Cipher = Annotated[CredentialSealer, Depends(get_cipher)]


async def take_rate_budget(request: Request, user: CurrentUser) -> None:
    """The rate budget of a route that authenticates through `CurrentUser` (the hot paths
    take theirs themselves)."""
    budgets: Budgets = request.app.state.budgets
    await budgets.take_request(user.id)


# A route's parameter: the caller's rate budget is taken once they are authenticated.
RateBudget = Annotated[None, Depends(take_rate_budget)]
