from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status

from service.budgets import Budgets
from service.db import scope_for
from service.dependencies import (
    BEARER_SECURITY,
    CurrentUser,
    RateBudget,
    Session,
    request_bearer_token,
    request_transaction,
)
from service.errors import error_responses
from service.market.snapshot import MarketSnapshot
from service.models import PositionStatus
from service.positions import hot_path, service
from service.positions.schemas import PositionCreate, PositionOut, PositionPage
from service.positions.views import market_version, position_out
from service.queue import CLOSE_POSITION_TASK
from service.users.service import authenticate

router = APIRouter(prefix="/api/positions", tags=["positions"])

_ERRORS = error_responses(
    r401="missing, invalid or revoked token",
    r404="no such position for this user",
    r409="no Bybit credentials stored",
    r422="invalid index, size or direction, a size the exchange would refuse (the message "
    "names the leg, the limit and the size that would work), or an Idempotency-Key reused "
    "with another body",
    r429="a budget of the caller is used up: the request rate, or (opening) the number of "
    "positions not yet final; see Retry-After. Nothing was written",
    r503="market data or the database is unavailable: try again shortly",
)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=PositionOut,
    responses=_ERRORS,
    summary="Open a position: answers at once with the PENDING position; a worker executes it",
    openapi_extra=BEARER_SECURITY,
)
async def create_position(
    body: PositionCreate,
    request: Request,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=255,
            description="one key per intent: a repeat with the same body returns the first "
            "position; with a different body, 422. Keys are per user and do not expire.",
        ),
    ] = None,
) -> Response:
    state = request.app.state
    token = request_bearer_token(request)
    market = await state.market_cache.load()
    budgets: Budgets = state.budgets
    user_id = await state.user_ids.of_token(state.pool, token)
    async with _admitted(budgets, user_id):
        # The common case in one statement (hot_path); a position this request created has
        # no components, trades or issues yet.
        opening = service.OpenRequest(
            body.index, body.size, body.direction, idempotency_key, body.execution
        )
        created = await hot_path.accept_position(
            state.pool,
            state.publisher,
            opening,
            token=token,
            market=market,
            indices=state.index_cache,
            open_limit=budgets.open_positions,
            user_id=user_id,
        )
        if created is not None:
            return _json(
                service.PositionDetail(position=created, components=[], trades=[]), market, 202
            )
        # Everything else, with every check in its order and its own answer. The task of a
        # position created here is sent once the transaction has committed.
        async with request_transaction(request) as session:
            # A token unknown a moment ago (user_id None) and valid now, issued meanwhile:
            # open_position takes the user's admission lock itself, so the count holds.
            user = await authenticate(session, token)
            opened = await service.open_position(
                session, user, opening, market=market, indices=state.index_cache, budgets=budgets
            )
            if opened.created:
                detail = service.PositionDetail(position=opened.position, components=[], trades=[])
            else:
                detail = await service.load_detail(session, opened.position, state.index_cache)
    return _json(detail, market, 202, replayed=not opened.created)


@asynccontextmanager
async def _admitted(budgets: Budgets, user_id: uuid.UUID | None) -> AsyncIterator[None]:
    """The user's rate budget and turn among their admissions (service/budgets.py) for the
    block; nothing for a token no user has (the request's own check answers 401)."""
    if user_id is None:
        yield
        return
    async with budgets.admission(user_id):
        yield


_CLOSE_ERRORS = error_responses(
    r401="missing, invalid or revoked token",
    r404="no such position for this user",
    r409="the position cannot be closed now: still opening (PENDING, EXECUTING), already "
    "closing or closed, or FAILED with nothing filled",
    r429="the caller's request rate budget is used up (see Retry-After). Nothing was written",
    r503="the database is unavailable: try again shortly",
)


@router.post(
    "/{position_id}/close",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=PositionOut,
    responses=_CLOSE_ERRORS,
    summary="Close a position: answers at once with the CLOSING position; a worker sends a "
    "reduce-only market order per leg for what this position holds",
    openapi_extra=BEARER_SECURITY,
)
async def close_position(
    position_id: uuid.UUID,
    request: Request,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=255,
            description="one key per intent: a repeat returns the position as it is and "
            "starts nothing. Keys are per position and do not expire.",
        ),
    ] = None,
) -> Response:
    """ACTIVE, FAILED holding legs (to flatten what a failed basket left), or CLOSE_FAILED
    (to close what the last close could not). Each leg is closed on its own: one that cannot
    be closed does not stop the others; the position ends CLOSED, or CLOSE_FAILED with each
    leg still held in `close_error` and `legs[].held_quantity`."""
    state = request.app.state
    token = request_bearer_token(request)
    market = await state.market_cache.load()
    async with request_transaction(request) as session:
        user = await authenticate(session, token)
    budgets: Budgets = state.budgets
    # A rate token only: a close reduces what the user holds, so the open-positions budget
    # never stands in its way.
    await budgets.take_request(user.id)
    requested = await service.request_close(
        scope_for(state.session_factory), user, position_id, idempotency_key=idempotency_key
    )
    if requested.started:
        # If this push is lost, the recovery sweep sends the unclaimed close.
        await state.publisher.try_publish(position_id, task=CLOSE_POSITION_TASK)
    async with request_transaction(request) as session:
        position = await service.get_position(session, user, position_id)
        detail = await service.load_detail(session, position, state.index_cache)
    return _json(detail, market, 202, replayed=not requested.started)


_CANCEL_ERRORS = error_responses(
    r401="missing, invalid, revoked or expired token",
    r404="no such position for this user",
    r409="the position cannot be cancelled: a worker has claimed it (EXECUTING or later)",
    r429="the caller's request rate budget is used up (see Retry-After)",
    r503="the database is unavailable: try again shortly",
)


@router.post(
    "/{position_id}/cancel",
    status_code=status.HTTP_200_OK,
    response_model=PositionOut,
    responses=_CANCEL_ERRORS,
    summary="Cancel a position still PENDING (no worker has claimed it, nothing was sent): "
    "it ends CANCELLED",
    openapi_extra=BEARER_SECURITY,
)
async def cancel_position(position_id: uuid.UUID, request: Request) -> Response:
    """Only a PENDING position can be cancelled; against a worker claiming it at the same
    moment, exactly one wins (a 409 when the worker did). A repeat on a CANCELLED position
    answers with it again (200)."""
    state = request.app.state
    token = request_bearer_token(request)
    market = await state.market_cache.load()
    async with request_transaction(request) as session:
        user = await authenticate(session, token)
    await state.budgets.take_request(user.id)
    await service.cancel_position(scope_for(state.session_factory), user, position_id)
    async with request_transaction(request) as session:
        position = await service.get_position(session, user, position_id)
        detail = await service.load_detail(session, position, state.index_cache)
    return _json(detail, market, 200)


def _json(
    detail: service.PositionDetail,
    market: MarketSnapshot | None,
    status_code: int,
    *,
    replayed: bool = False,
) -> Response:
    """The position as JSON, with its Location. Rendered here rather than by FastAPI's
    response_model, which would validate the model a second time."""
    headers = {"Location": f"/api/positions/{detail.position.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(
        position_out(detail, market).model_dump_json().encode(),
        status_code=status_code,
        headers=headers,
        media_type="application/json",
    )


@router.get(
    "/{position_id}",
    response_model=PositionOut,
    responses={**_ERRORS, 304: {"description": "unchanged since the ETag in If-None-Match"}},
    openapi_extra=BEARER_SECURITY,
)
async def get_position(
    position_id: uuid.UUID,
    request: Request,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    state = request.app.state
    token = request_bearer_token(request)
    user_id = await state.user_ids.of_token(state.pool, token)
    if user_id is not None:  # else the request's own check answers 401
        await state.budgets.take_request(user_id)
    market = await state.market_cache.load()
    version = market_version(market)
    # Polling costs one statement (the caller's token and the position's version); an
    # unchanged position is a 304, a version already rendered is served from memory.
    tag = await hot_path.position_etag(state.pool, token, position_id, version)
    rendered: hot_path.RenderedPositions = state.rendered
    if tag is not None:
        if if_none_match and _matches(tag, if_none_match):
            return _not_modified(tag)
        body = rendered.get(position_id, tag)
        if body is not None:
            return Response(body, headers=_cache_headers(tag), media_type="application/json")
    # Not found (the full path says why: the token or the position), or not rendered yet.
    async with request_transaction(request) as session:
        user = await authenticate(session, token)
        position = await service.get_position(session, user, position_id)
        tag = service.etag(position, version)
        if if_none_match and _matches(tag, if_none_match):
            return _not_modified(tag)
        detail = await service.load_detail(session, position, state.index_cache)
        body = position_out(detail, market).model_dump_json().encode()
    rendered.put(position_id, tag, body)
    return Response(body, headers=_cache_headers(tag), media_type="application/json")


def _not_modified(tag: str) -> Response:
    return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=_cache_headers(tag))


def _matches(tag: str, if_none_match: str) -> bool:
    return tag in {t.strip() for t in if_none_match.split(",")}


def _cache_headers(tag: str) -> dict[str, str]:
    # no-store: no cache (a proxy's, the browser's) keeps a user's position; a poller keeps
    # the ETag itself and sends it back in If-None-Match for its 304.
    return {"ETag": tag, "Cache-Control": "no-store"}


@router.get("", response_model=PositionPage, responses=_ERRORS)
async def list_positions(
    request: Request,
    user: CurrentUser,
    _budget: RateBudget,
    session: Session,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    status_filter: Annotated[PositionStatus | None, Query(alias="status")] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> PositionPage:
    state = request.app.state
    market = await state.market_cache.load()
    page = await service.list_positions(
        session,
        user,
        limit=limit,
        indices=state.index_cache,
        status=status_filter,
        cursor=cursor,
    )
    return PositionPage(
        items=[position_out(d, market) for d in page.items], next_cursor=page.next_cursor
    )
