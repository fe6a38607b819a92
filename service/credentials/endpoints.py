from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, status
from pydantic import BaseModel, ConfigDict, Field

from service.credentials import service
from service.dependencies import Cipher, CurrentUser, Session
from service.errors import error_responses

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


@router.put(
    "",
    response_model=CredentialsOut,
    responses=error_responses(r401="missing or bad token", r422="malformed key or secret"),
)
async def put_credentials(
    body: CredentialsIn, user: CurrentUser, session: Session, cipher: Cipher
) -> CredentialsOut:
    await service.store_credentials(
        session, cipher, user.id, api_key=body.api_key, api_secret=body.api_secret
    )
    view = await service.view_credentials(session, user.id)
    return CredentialsOut(api_key=view.api_key, updated_at=view.updated_at)


@router.get(
    "",
    response_model=CredentialsOut,
    responses=error_responses(r401="missing or bad token", r404="no credentials stored"),
)
async def get_credentials(user: CurrentUser, session: Session) -> CredentialsOut:
    view = await service.view_credentials(session, user.id)
    return CredentialsOut(api_key=view.api_key, updated_at=view.updated_at)


@router.delete(
    "",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=error_responses(r401="missing or bad token", r404="no credentials stored"),
)
async def delete_credentials(user: CurrentUser, session: Session) -> None:
    await service.delete_credentials(session, user.id)
