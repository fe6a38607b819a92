"""What the long scenarios share: funded users with stored credentials, waiting for final
statuses, and counting orders on the simulator."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx

from tests.integration.conftest import funded_trader
from tests.support import ApiUser, eventually

__all__ = ["funded_trader"]  # where the long scenarios have always found it

FINAL = ("ACTIVE", "FAILED")


async def wait_final(
    api: httpx.AsyncClient, owners: dict[str, ApiUser], *, timeout: float
) -> dict[str, dict[str, Any]]:
    """Poll every position (as its owner) until all are ACTIVE or FAILED."""
    done: dict[str, dict[str, Any]] = {}

    async def probe() -> dict[str, dict[str, Any]] | None:
        for position_id, user in owners.items():
            if position_id in done:
                continue
            response = await api.get(f"/api/positions/{position_id}", headers=user.headers)
            if response.status_code == 200 and response.json()["status"] in FINAL:
                done[position_id] = response.json()
        return done if len(done) == len(owners) else None

    return await eventually(
        probe, timeout=timeout, interval=0.25, message=f"{len(owners)} positions final"
    )


async def orders_of(sim: httpx.AsyncClient, users: list[ApiUser]) -> list[dict[str, Any]]:
    orders: list[dict[str, Any]] = []
    for user in users:
        response = await sim.get("/sim/orders", params={"api_key": user.api_key})
        orders.extend(response.json()["orders"])
    return orders


def duplicate_links(orders: list[dict[str, Any]]) -> int:
    counts = Counter(o["orderLinkId"] for o in orders)
    return sum(n - 1 for n in counts.values())
