from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status

from service.dependencies import (
    BEARER_SECURITY,
    CurrentUser,
    Session,
    request_bearer_token,
    request_transaction,
)
from service.errors import error_responses
from service.models import PositionStatus
from service.positions import hot_path, service
from service.positions.schemas import (
    ComponentOut,
    ExposureOut,
    LegOut,
    PositionCreate,
    PositionOut,
    PositionPage,
    ReconciliationOut,
    TradeOut,
)
from service.users.service import authenticate

router = APIRouter(prefix="/api/positions", tags=["positions"])

_ERRORS = error_responses(
    r401="missing, invalid or revoked token",
    r404="no such position for this user",
    r409="no Bybit credentials stored",
    r422="invalid index, size or direction, a size the exchange would refuse (the message "
    "names the leg, the limit and the size that would work), or an Idempotency-Key reused "
    "with another body",
    r503="market data or the database is unavailable: try again shortly",
)


def _exposure(trades: list[TradeOut]) -> list[ExposureOut]:
    held: dict[tuple[str, str], Decimal] = {}
    for trade in trades:
        key = (trade.symbol, trade.side)
        held[key] = held.get(key, Decimal(0)) + trade.quantity
    return [ExposureOut(symbol=s, side=side, quantity=q) for (s, side), q in held.items()]


def _legs(detail: service.PositionDetail) -> list[LegOut]:
    filled: dict[int, Decimal] = {}
    for trade in detail.trades:
        filled[trade.leg] = filled.get(trade.leg, Decimal(0)) + trade.quantity
    return [
        LegOut(
            leg=leg.leg,
            symbol=leg.symbol,
            side=leg.side,
            planned_quantity=leg.quantity,
            filled_quantity=filled.get(leg.leg, Decimal(0)),
            shortfall_quantity=max(leg.quantity - filled.get(leg.leg, Decimal(0)), Decimal(0)),
            reference_price=leg.reference_price,
        )
        for leg in detail.plan
    ]


def _out(detail: service.PositionDetail) -> PositionOut:
    p = detail.position
    trades = [
        TradeOut(
            leg=t.leg,
            symbol=t.symbol,
            side=t.side,
            bybit_order_id=t.bybit_order_id,
            order_link_id=t.order_link_id,
            price=t.price,
            quantity=t.quantity,
            fee=t.fee,
            fee_coin=t.fee_coin,
            order_status=t.order_status,
            executed_at=t.executed_at,
        )
        for t in detail.trades
    ]
    legs = _legs(detail)
    return PositionOut(
        id=p.id,
        index=p.index_code,
        size=p.size,
        direction=p.direction,
        status=p.status,
        error=p.error,
        failed_leg=p.failed_leg,
        attempts=p.attempts,
        next_attempt_at=p.next_attempt_at,
        waiting_for_account=p.account_wait_since is not None,
        waiting_since=p.account_wait_since,
        created_at=p.created_at,
        updated_at=p.updated_at,
        components=[
            ComponentOut(symbol=c.symbol, side=c.side, expected_quantity=c.expected_quantity)
            for c in detail.components
        ],
        legs=legs,
        # Only once the basket is done: while it executes, unfilled legs are not short yet.
        shortfall=p.status in ("ACTIVE", "FAILED")
        and any(leg.shortfall_quantity > 0 and leg.filled_quantity > 0 for leg in legs),
        trades=trades,
        exposure=_exposure(trades),
        reconciliation=[
            ReconciliationOut(
                kind=i.kind,
                order_link_id=i.order_link_id,
                exchange=i.exchange,
                recorded=i.recorded,
                found_at=i.created_at,
            )
            for i in detail.issues
        ],
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
    # The common case in one statement (hot_path); a position this request created has no
    # components, trades or issues yet.
    opening = service.OpenRequest(body.index, body.size, body.direction, idempotency_key)
    created = await hot_path.accept_position(
        state.pool, state.publisher, opening, token=token, market=market, indices=state.index_cache
    )
    if created is not None:
        return _json(service.PositionDetail(position=created, components=[], trades=[]), 202)
    # Everything else, with every check in its order and its own answer. The task of a
    # position created here is sent once the transaction has committed.
    async with request_transaction(request) as session:
        user = await authenticate(session, token)
        opened = await service.open_position(
            session, user, opening, market=market, indices=state.index_cache
        )
        if opened.created:
            detail = service.PositionDetail(position=opened.position, components=[], trades=[])
        else:
            detail = await service.load_detail(session, opened.position)
    return _json(detail, 202, replayed=not opened.created)


def _json(detail: service.PositionDetail, status_code: int, *, replayed: bool = False) -> Response:
    """The position as JSON, with its Location. Rendered here rather than by FastAPI's
    response_model, which would validate the model a second time."""
    headers = {"Location": f"/api/positions/{detail.position.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(
        _out(detail).model_dump_json().encode(),
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
    # Polling costs one statement (the caller's token and the position's version); an
    # unchanged position is a 304, a version already rendered is served from memory.
    tag = await hot_path.position_etag(state.pool, token, position_id)
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
        tag = service.etag(position)
        if if_none_match and _matches(tag, if_none_match):
            return _not_modified(tag)
        body = _out(await service.load_detail(session, position)).model_dump_json().encode()
    rendered.put(position_id, tag, body)
    return Response(body, headers=_cache_headers(tag), media_type="application/json")


def _not_modified(tag: str) -> Response:
    return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=_cache_headers(tag))


def _matches(tag: str, if_none_match: str) -> bool:
    return tag in {t.strip() for t in if_none_match.split(",")}


def _cache_headers(tag: str) -> dict[str, str]:
    return {"ETag": tag, "Cache-Control": "no-cache"}


@router.get("", response_model=PositionPage, responses=_ERRORS)
async def list_positions(
    user: CurrentUser,
    session: Session,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    status_filter: Annotated[PositionStatus | None, Query(alias="status")] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> PositionPage:
    page = await service.list_positions(
        session, user, limit=limit, status=status_filter, cursor=cursor
    )
    return PositionPage(items=[_out(d) for d in page.items], next_cursor=page.next_cursor)
