"""Order entry: order/create and order/create-batch, both through `trading.place_order`, with
the per-order faults (a fault with a `symbol`).

create-batch (Bybit's docs/v5/order/batch-place.mdx): `{"category", "request": [order, ...]}`,
each order with order/create's fields. The whole request is refused (10001) when `request` is
not a non-empty list of objects or carries more than `batch_max_orders`; otherwise the orders
are taken one after the other, each exactly as a single order/create would be (a later one sees
the margin and the orderLinkIds of the earlier ones), and the reply is retCode 0 whatever became
of them: `result.list[i]` and `retExtInfo.list[i]` tell order i's fate, in the order sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.simulator import trading
from service.simulator.errors import BybitError, params_error
from service.simulator.ratelimit import BATCH_CREATE, ORDER_CREATE
from service.simulator.state import Account, Order, SimulatorState

__all__ = ["BATCH_CREATE", "ORDER_CREATE", "batch_orders", "create_batch", "create_order"]
TOO_MANY = (10006, "Too many visits!")


@dataclass(frozen=True)
class Outcome:
    """What became of one order: `order` when it was recorded, and the code and message it is
    reported with (non-zero for a refusal, or for an ambiguous order that was recorded)."""

    order: Order | None
    code: int = 0
    msg: str = "OK"


def create_order(state: SimulatorState, account: Account, body: dict[str, Any]) -> dict[str, Any]:
    """order/create: one order, subject to the per-order faults for its symbol."""
    outcome = place(state, account, ORDER_CREATE, body)
    if outcome.code:
        raise BybitError(outcome.code, outcome.msg)
    assert outcome.order is not None  # code 0 is only ever given to a recorded order
    return trading.acknowledgement(outcome.order)


def place(state: SimulatorState, account: Account, path: str, body: dict[str, Any]) -> Outcome:
    """Take one order. A per-order fault for its symbol may refuse it (`retcode`: nothing
    recorded) or, once it was taken as usual, report it failed anyway (`retcode_after_fill`:
    Bybit answering 10016 for an order that did land)."""
    symbol = body.get("symbol")
    fault = (
        state.faults.claim_order(path, account.api_key, symbol) if isinstance(symbol, str) else None
    )
    if fault is not None and fault.kind == "retcode":
        return Outcome(None, fault.ret_code, fault.ret_msg)
    try:
        outcome = Outcome(trading.place_order(state, account, body))
    except BybitError as error:
        outcome = Outcome(None, error.code, error.msg)
    if fault is not None:  # retcode_after_fill: the client learns nothing of what happened
        return Outcome(outcome.order, fault.ret_code, fault.ret_msg)
    return outcome


def batch_orders(body: dict[str, Any], max_orders: int) -> list[dict[str, Any]]:
    """The orders of a create-batch body, each with the batch's category; 10001 for the whole
    request when it cannot be taken."""
    trading.require_linear(body)
    orders = body.get("request")
    if not isinstance(orders, list):
        raise params_error("request must be an array of orders")
    if not orders:
        raise params_error("request is empty")
    if len(orders) > max_orders:
        raise params_error(f"too many orders: {len(orders)} > {max_orders} in one batch")
    if not all(isinstance(order, dict) for order in orders):
        raise params_error("each order of request must be an object")
    # The batch's category applies to every order, whatever an order says of its own.
    return [{**order, "category": body["category"]} for order in orders]


@dataclass(frozen=True)
class BatchReply:
    """create-batch's reply: `result` and `retExtInfo`, each `{"list": [...]}` in order."""

    result: dict[str, Any]
    ext: dict[str, Any]


def create_batch(
    state: SimulatorState, account: Account, orders: list[dict[str, Any]], admitted: int
) -> BatchReply:
    """Take the first `admitted` orders in turn; the rate limit refuses the rest (10006 each,
    not carried out)."""
    outcomes = [
        place(state, account, BATCH_CREATE, order) if n < admitted else Outcome(None, *TOO_MANY)
        for n, order in enumerate(orders)
    ]
    items = [_item(order, outcome) for order, outcome in zip(orders, outcomes, strict=True)]
    codes = [{"code": outcome.code, "msg": outcome.msg} for outcome in outcomes]
    return BatchReply(result={"list": items}, ext={"list": codes})


def _item(body: dict[str, Any], outcome: Outcome) -> dict[str, str]:
    """`result.list[i]`: the order's ids and creation time, blank ("") unless it succeeded;
    a failed order keeps the symbol and orderLinkId it was sent with."""
    order = outcome.order if outcome.code == 0 else None
    return {
        "category": str(body["category"]),
        "symbol": _text(body.get("symbol")),
        "orderId": order.order_id if order is not None else "",
        "orderLinkId": order.order_link_id if order is not None else _text(body.get("orderLinkId")),
        "createAt": str(order.created_ms) if order is not None else "",
    }


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""
