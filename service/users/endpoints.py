"""The caller's own bearer tokens: list them, revoke one (e.g. one left on a lost laptop).
Never the token or its hash: each is known by its id."""

from __future__ import annotations

import uuid
from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel

from service.dependencies import CurrentUser, RateBudget, Session
from service.errors import error_responses
from service.users import service

router = APIRouter(prefix="/api/tokens", tags=["tokens"])


class TokenOut(BaseModel):
    id: uuid.UUID
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None


def _out(token: service.TokenInfo) -> TokenOut:
    return TokenOut(
        id=token.id,
        created_at=token.created_at,
        expires_at=token.expires_at,
        revoked_at=token.revoked_at,
    )


@router.get(
    "",
    response_model=list[TokenOut],
    responses=error_responses(
        r401="missing, invalid, revoked or expired token",
        r429="the caller's request rate budget is used up (see Retry-After)",
    ),
    summary="The caller's tokens, oldest first, live or not (never the token itself)",
)
async def list_tokens(user: CurrentUser, _budget: RateBudget, session: Session) -> list[TokenOut]:
    return [_out(t) for t in await service.list_own_tokens(session, user)]


@router.delete(
    "/{token_id}",
    response_model=TokenOut,
    responses=error_responses(
        r401="missing, invalid, revoked or expired token",
        r404="no such token for this user",
        r429="the caller's request rate budget is used up (see Retry-After)",
    ),
    summary="Revoke one of the caller's tokens (the one sending this request too, if named): "
    "requests with it get 401 from now on",
)
async def revoke_token(
    token_id: uuid.UUID, user: CurrentUser, _budget: RateBudget, session: Session
) -> TokenOut:
    await service.revoke_token(session, token_id, user=user)
    tokens = {t.id: t for t in await service.list_own_tokens(session, user)}
    return _out(tokens[token_id])
