from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Request, status
from pydantic import BaseModel, ConfigDict, Field

from service.bybit.auth import ApiCredentials
from service.credentials import key_check, service
from service.dependencies import (
    Bearer,
    Cipher,
    CurrentUser,
    RateBudget,
    Session,
    bearer_token,
    request_transaction,
)
from service.errors import error_responses
from service.models import User
from service.users.service import authenticate

router = APIRouter(prefix="/api/credentials", tags=["credentials"])


class CredentialsIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"api_key": "XXXXXXXXXXXXXXXX", "api_secret": "…"}]},
    )

    api_key: str = Field(min_length=1, max_length=128)
    api_secret: str = Field(min_length=1, max_length=128)


class CredentialsOut(BaseModel):
    api_key: str = Field(description="masked: enough to recognise the key, never to use it")
    updated_at: datetime


class CredentialsStored(CredentialsOut):
    warnings: list[str] = Field(
        default_factory=list,
        description="what the key should still change (e.g. no IP whitelist); it is stored",
    )


async def _caller(request: Request, bearer: Bearer) -> User:
    """The caller, authenticated in a transaction of its own (ended before Bybit is asked)."""
    async with request_transaction(request) as session:
        return await authenticate(session, bearer_token(bearer))


@router.put(
    "",
    response_model=CredentialsStored,
    responses=error_responses(
        r401="missing or bad token",
        r422="malformed key or secret; a key Bybit refuses; a key that cannot trade linear "
        "contracts (read-only, or without the Contract Orders and Positions permissions) or "
        "that can withdraw",
        r429="the caller's request rate budget is used up (see Retry-After)",
        r503="Bybit cannot be asked about the key now (see Retry-After); nothing was stored",
    ),
)
async def put_credentials(
    body: CredentialsIn,
    request: Request,
    user: Annotated[User, Depends(_caller)],
    cipher: Cipher,
) -> CredentialsStored:
    """The key is first checked against Bybit (`/v5/user/query-api`): only a key that can
    trade linear contracts and cannot withdraw is stored."""
    await request.app.state.budgets.take_request(user.id)
    verdict = key_check.KeyVerdict()
    if key_check.sendable(body.api_key, body.api_secret):
        # A malformed pair is not sent anywhere: the store refuses it below. No database
        # connection is held while Bybit is asked.
        credentials = ApiCredentials(api_key=body.api_key, api_secret=body.api_secret)
        verdict = await key_check.check_key(
            request.app.state.exchange, credentials, demo=request.app.state.exchange_is_demo
        )
    async with request_transaction(request) as session:
        await service.store_credentials(
            session, cipher, user.id, api_key=body.api_key, api_secret=body.api_secret
        )
        view = await service.view_credentials(session, user.id)
    return CredentialsStored(
        api_key=view.api_key, updated_at=view.updated_at, warnings=verdict.warnings
    )


@router.get(
    "",
    response_model=CredentialsOut,
    responses=error_responses(
        r401="missing or bad token",
        r404="no credentials stored",
        r429="the caller's request rate budget is used up (see Retry-After)",
    ),
)
async def get_credentials(
    user: CurrentUser, _budget: RateBudget, session: Session
) -> CredentialsOut:
    view = await service.view_credentials(session, user.id)
    return CredentialsOut(api_key=view.api_key, updated_at=view.updated_at)


@router.delete(
    "",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=error_responses(
        r401="missing or bad token",
        r404="no credentials stored",
        r429="the caller's request rate budget is used up (see Retry-After)",
    ),
)
async def delete_credentials(user: CurrentUser, _budget: RateBudget, session: Session) -> None:
    await service.delete_credentials(session, user.id)
