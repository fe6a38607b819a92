"""100 duplicate enqueues of live positions: the run lock and the claim discard every copy,
and no leg is ordered twice."""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from pathlib import Path

import httpx
import pytest

from celery_app import app as celery_app
from service.config import get_settings
from service.queue import EXECUTE_TRADE_TASK
from tests.conftest import TEST_ENV
from tests.integration.conftest import api_client, start_worker
from tests.reliability.helpers import duplicate_links, funded_trader, orders_of, wait_final
from tests.reliability.report import table, write_section
from tests.support import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]  # long scenarios

POSITIONS = int(os.environ.get("DUPLICATE_POSITIONS", "20"))
COPIES = int(os.environ.get("DUPLICATE_COPIES", "5"))
L1 = {"index": "L1", "size": "3000", "direction": "long"}  # 5 legs


@pytest.mark.asyncio
async def test_duplicate_enqueues_of_live_positions_place_no_extra_order(
    service_env: dict[str, str], sim: httpx.AsyncClient, sessions: object, tmp_path: Path
) -> None:
    rng = random.Random(20261125)
    await sim.put("/sim/config", json={"latency_ms": 30, "order_rate_limit": 0})
    # Two workers of two processes each: copies of one position can run side by side.
    workers = [start_worker(service_env, tmp_path) for _ in range(2)]
    try:
        async with api_client(get_settings()) as api:
            users = [await funded_trader(sessions, sim, api) for _ in range(4)]
            owners = {}
            copies_sent = 0
            for n in range(POSITIONS):
                user = users[n % len(users)]
                response = await api.post("/api/positions", json=L1, headers=user.headers)
                assert response.status_code == 202, response.text
                position_id = response.json()["id"]
                owners[position_id] = user
                # Copies while the original is queued or running, at random moments.
                for _ in range(COPIES):
                    await asyncio.sleep(rng.uniform(0, 0.05))
                    # Sent by Celery itself: its messages and the API's share the queue.
                    await asyncio.to_thread(
                        celery_app.send_task,
                        EXECUTE_TRADE_TASK,
                        args=[position_id],
                        queue=TEST_ENV["CELERY_QUEUE"],
                    )
                    copies_sent += 1
            final = await wait_final(api, owners, timeout=180)
            orders = await orders_of(sim, users)

            # Every copy read and turned away before the workers stop: a copy still queued
            # when they stop would be counted as neither.
            async def turned_away() -> bool:
                seen = "".join(w.output() for w in workers)
                return seen.count('"event": "position.discarded"') >= copies_sent

            await eventually(
                turned_away, timeout=60, interval=0.2, message="every copy turned away"
            )
    finally:
        for worker in workers:
            worker.stop()
        await sim.put("/sim/config", json={"latency_ms": 0, "order_rate_limit": 10})
    events = "".join(w.output() for w in workers)
    discarded = events.count('"event": "position.discarded"')
    resent = events.count('"event": "leg.duplicate_order_link_id"')
    statuses = Counter(p["status"] for p in final.values())
    duplicates = duplicate_links(orders)
    body = f"""
Command: `scripts/dev reliability -k duplicate` (`DUPLICATE_POSITIONS={POSITIONS}
DUPLICATE_COPIES={COPIES}`). Simulator latency 30 ms; two workers of two pool processes each.

{POSITIONS} five-leg positions (`L1`) posted through the API; right after each, {COPIES}
more copies of its `execute_trade_task` are published at random moments 0 to 50 ms apart,
while the original is queued or running.

{
        table(
            [
                ("positions", POSITIONS),
                ("duplicate enqueues", copies_sent),
                ("ended ACTIVE", statuses["ACTIVE"]),
                ("ended FAILED", statuses["FAILED"]),
                ("copies discarded (run lock held, or not the claim's task)", discarded),
                ("orders on the exchange (5 legs each)", len(orders)),
                ("extra orders (same orderLinkId twice)", duplicates),
                ("legs re-sent and refused by Bybit as duplicates", resent),
            ]
        )
    }
"""
    write_section("duplicates", "Duplicate enqueues of live positions", body)
    assert copies_sent == POSITIONS * COPIES
    assert statuses["ACTIVE"] == POSITIONS
    assert duplicates == 0
    assert resent == 0
    assert len(orders) == 5 * POSITIONS
    assert discarded >= copies_sent
