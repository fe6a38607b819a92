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

            # Every message read before the workers stop: a copy still queued when they stop
            # would be counted as neither. A delivery of a position runs it (once), is turned
            # away, or finds its account busy with another basket of the user and gives its
            # slot back (waiting); the basket that held the account then sends the one that
            # has waited longest (`account.handed_off`): one more delivery.
            async def all_read() -> bool:
                read, sent = _deliveries("".join(w.output() for w in workers), copies_sent)
                return read >= sent

            await eventually(all_read, timeout=60, interval=0.2, message="every message read")
    finally:
        for worker in workers:
            worker.stop()
        await sim.put("/sim/config", json={"latency_ms": 0, "order_rate_limit": 10})
    events = "".join(w.output() for w in workers)
    discarded = events.count('"event": "position.discarded"')
    waited = events.count('"event": "position.waiting_for_account"')
    handed_off = events.count('"event": "account.handed_off"')
    read, sent = _deliveries(events, copies_sent)
    resent = events.count('"event": "leg.duplicate_order_link_id"')
    statuses = Counter(p["status"] for p in final.values())
    duplicates = duplicate_links(orders)
    body = f"""
Command: `scripts/dev reliability -k duplicate` (`DUPLICATE_POSITIONS={POSITIONS}
DUPLICATE_COPIES={COPIES}`). Simulator latency 30 ms; two workers of two pool processes each.

{POSITIONS} five-leg positions (`L1`) posted through the API; right after each, {COPIES}
more copies of its `execute_trade_task` are published at random moments 0 to 50 ms apart,
while the original is queued or running. The four users' baskets take turns on their
accounts: a delivery that finds its account busy with another basket of the same user gives
its slot back, and the basket holding the account sends the one that has waited longest
when it is final. Every delivery is accounted for: a run that opened the basket, one turned
away, or one gone waiting.

{
        table(
            [
                ("positions", POSITIONS),
                ("duplicate enqueues", copies_sent),
                ("ended ACTIVE", statuses["ACTIVE"]),
                ("ended FAILED", statuses["FAILED"]),
                ("copies discarded (run lock held, or not the claim's task)", discarded),
                ("deliveries that found the account busy and gave their slot back", waited),
                ("baskets sent on by the one that held their account", handed_off),
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
    assert read == sent  # every delivery ran the basket once, or placed nothing


def _deliveries(events: str, copies: int) -> tuple[int, int]:
    """(deliveries read, deliveries sent), from the workers' log. Sent: each position's
    original, its copies, and one for each hand-off. Read: one run of each position that
    opened it, and each delivery turned away or gone waiting for its account."""
    runs = events.count('"event": "position.planned"')
    read = (
        runs
        + events.count('"event": "position.discarded"')
        + events.count('"event": "position.waiting_for_account"')
    )
    return read, POSITIONS + copies + events.count('"event": "account.handed_off"')
