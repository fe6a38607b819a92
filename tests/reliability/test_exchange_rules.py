"""Baskets under the real exchange's rules: retCodes Bybit sends under load or in passing
(429, 10018, 403, 10002, 110063, 110066, 110079, and 10016 where the order did land), hedge-mode
and isolated-margin accounts, a position the user already holds, and thin books. Every
position must end ACTIVE, or FAILED before its first order with a clear reason; no order may
be placed twice, and no position may hold part of a basket because a code was misread.

Run with `scripts/dev reliability -k exchange_rules`; the figures go to docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import secrets
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.config import get_settings
from tests.integration.conftest import api_client, start_worker
from tests.reliability.helpers import duplicate_links, funded_trader, orders_of, wait_final
from tests.reliability.report import table, write_section
from tests.support import ApiUser

pytestmark = [pytest.mark.integration, pytest.mark.asyncio, pytest.mark.timeout(1800)]

ROUNDS = int(os.environ.get("EXCHANGE_RULES_ROUNDS", "3"))
L1 = {"index": "L1", "size": "3000", "direction": "long"}  # 5 legs, SOL AVAX NEAR SUI APT
BLUECHIP = {"index": "BLUECHIP", "size": "2000", "direction": "long"}  # BTC, ETH
BAN_SECONDS = 2

# name -> the fault on order/create (on a random leg)
FAULTS: dict[str, dict[str, Any]] = {
    "retCode 429, not taken": {"kind": "retcode", "retCode": 429},
    "retCode 429, taken": {"kind": "retcode_after_fill", "retCode": 429},
    "retCode 10016, taken": {"kind": "retcode_after_fill", "retCode": 10016},
    "retCode 10018 (IP limit)": {"kind": "retcode", "retCode": 10018},
    "HTTP 403 (IP limit)": {"kind": "http_status", "status": 403},
    "retCode 10002 (clock)": {"kind": "retcode", "retCode": 10002},
    "retCode 110063 (settlement)": {"kind": "retcode", "retCode": 110063},
    "retCode 110066 (not allowed now)": {"kind": "retcode", "retCode": 110066},
    "retCode 110079 (processing)": {"kind": "retcode", "retCode": 110079},
}
# name -> (account options, a position already held, BLUECHIP's BTC book depth)
ACCOUNTS: dict[str, tuple[dict[str, Any], dict[str, Any] | None, str | None]] = {
    "hedge-mode account": ({"position_mode": "hedge"}, None, None),
    "isolated-margin account": ({"margin_mode": "ISOLATED_MARGIN"}, None, None),
    "portfolio-margin account": ({"margin_mode": "PORTFOLIO_MARGIN"}, None, None),
    "thin book (BTC 0.005 per order)": ({}, None, "0.005"),
    "very thin book (BTC 0.002 per order)": ({}, None, "0.002"),
    "hedge mode, short ETH held": (
        {"position_mode": "hedge"},
        {"symbol": "ETHUSDT", "side": "Sell", "size": "1", "leverage": "1"},
        None,
    ),
    "one-way, short ETH held (refused)": (
        {},
        {"symbol": "ETHUSDT", "side": "Sell", "size": "1", "leverage": "1"},
        None,
    ),
}


async def _calls_during_bans(
    sim: httpx.AsyncClient, owners: dict[str, ApiUser], worker_log: str
) -> list[dict[str, Any]]:
    """Requests that reached the exchange while a ban lasted: from a moment after each run
    met its 403 or 10018 (its `leg.retry_scheduled`) to a moment before the ban's end."""
    starts = []
    for line in worker_log.splitlines():
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        error = str(event.get("error", ""))
        if event.get("event") == "leg.retry_scheduled" and (
            "http=403" in error or "retCode=10018" in error
        ):
            starts.append(datetime.fromisoformat(event["timestamp"]).timestamp() * 1000)
    windows = [(at + 100, at + BAN_SECONDS * 1000 - 200) for at in starts]
    ours = {user.api_key for user in owners.values()}
    calls = (await sim.get("/sim/calls")).json()["calls"]
    return [
        c
        for c in calls
        if c["api_key"] in ours and any(low <= c["arrived_ms"] <= high for low, high in windows)
    ]


async def _account(
    sim: httpx.AsyncClient, sessions: object, api: httpx.AsyncClient, options: dict[str, Any]
) -> ApiUser:
    user = await funded_trader(sessions, sim, api)
    if options:
        response = await sim.post(
            "/sim/accounts",
            json={
                "api_key": user.api_key,
                "api_secret": user.api_secret,
                "balance": "10000000",
                **options,
            },
        )
        response.raise_for_status()
    return user


async def test_exchange_rules(
    service_env: dict[str, str], sim: httpx.AsyncClient, sessions: object, tmp_path: Path
) -> None:
    env = {
        **service_env,
        "BYBIT_IP_BAN_SECONDS": str(BAN_SECONDS),
        # An address of its own: the ban it causes pauses only this scenario's workers.
        "BYBIT_EGRESS_ID": f"rules-{secrets.token_hex(4)}",
    }
    worker = start_worker(env, tmp_path)
    kinds: dict[str, str] = {}
    owners: dict[str, ApiUser] = {}
    try:
        async with api_client(get_settings()) as api:
            for round_number in range(ROUNDS):
                for name, fault in FAULTS.items():
                    user = await _account(sim, sessions, api, {})
                    response = await sim.post(
                        "/sim/faults",
                        json={
                            **fault,
                            "path": "/v5/order/create",
                            "api_key": user.api_key,
                            "skip": round_number % 5,
                        },
                    )
                    response.raise_for_status()
                    response = await api.post("/api/positions", json=L1, headers=user.headers)
                    assert response.status_code == 202, response.text
                    owners[response.json()["id"]] = user
                    kinds[response.json()["id"]] = name
            faulted = await wait_final(api, dict(owners), timeout=600)
            book: dict[str, dict[str, Any]] = {}
            for name, (options, held, depth) in ACCOUNTS.items():
                await sim.put("/sim/instruments/BTCUSDT", json={"bookDepth": depth})
                ids: dict[str, ApiUser] = {}
                for _ in range(ROUNDS):
                    user = await _account(sim, sessions, api, options)
                    if held is not None:
                        await sim.post("/sim/positions", json={"api_key": user.api_key, **held})
                    response = await api.post("/api/positions", json=BLUECHIP, headers=user.headers)
                    assert response.status_code == 202, response.text
                    ids[response.json()["id"]] = user
                    kinds[response.json()["id"]] = name
                book.update(await wait_final(api, ids, timeout=300))
                owners.update(ids)
            await sim.put("/sim/instruments/BTCUSDT", json={"bookDepth": None})
            orders = await orders_of(sim, list(owners.values()))
    finally:
        worker.stop()
        await sim.delete("/sim/faults")
    final = {**faulted, **book}
    rows = _figures(final, kinds, orders)
    # While a ban lasts, nothing is sent from the address: not by the run that met it, not by
    # any other.
    early = await _calls_during_bans(sim, owners, worker.output())
    _write_report(rows, final, kinds, orders, early=len(early))
    held_part = [p for p, body in final.items() if body["status"] == "FAILED" and body["trades"]]
    assert held_part == [], [(kinds[p], final[p]["error"]) for p in held_part]
    assert duplicate_links(orders) == 0
    assert early == []
    for position_id, body in final.items():
        if kinds[position_id].endswith("(refused)"):
            assert body["status"] == "FAILED"
            assert body["error"].startswith("pre-flight:"), body["error"]
        else:
            assert body["status"] == "ACTIVE", (kinds[position_id], body["error"])


def _figures(
    final: dict[str, dict[str, Any]], kinds: dict[str, str], orders: list[dict[str, Any]]
) -> list[tuple[str, int, int, int, int, int]]:
    links_per_kind: Counter[str] = Counter()
    owner = {p.replace("-", ""): p for p in final}
    for order in orders:
        prefix = order["orderLinkId"].split("-", 1)[0]
        position_id = next((p for h, p in owner.items() if h.startswith(prefix)), None)
        if position_id is not None:
            links_per_kind[kinds[position_id]] += 1
    rows = []
    for kind in [*FAULTS, *ACCOUNTS]:
        mine = [body for p, body in final.items() if kinds[p] == kind]
        rows.append(
            (
                kind,
                len(mine),
                sum(b["status"] == "ACTIVE" for b in mine),
                sum(b["status"] == "FAILED" and not b["trades"] for b in mine),
                sum(b["status"] == "FAILED" and bool(b["trades"]) for b in mine),
                sum(b.get("shortfall", False) for b in mine),
            )
        )
    return rows


def _write_report(
    rows: list[tuple[str, int, int, int, int, int]],
    final: dict[str, dict[str, Any]],
    kinds: dict[str, str],
    orders: list[dict[str, Any]],
    *,
    early: int,
) -> None:
    lines = [
        "| case | positions | ACTIVE | FAILED before any order | FAILED holding part | "
        "with a shortfall |",
        "|---|---|---|---|---|---|",
        *(f"| {k} | {n} | {a} | {f} | {h} | {s} |" for k, n, a, f, h, s in rows),
    ]
    refused = next((b["error"] for p, b in final.items() if kinds[p].endswith("(refused)")), "")
    body = f"""
Command: `scripts/dev reliability -k exchange_rules` (`EXCHANGE_RULES_ROUNDS={ROUNDS}`).
Settings: `TRADE_RETRY_DELAYS=0.2,0.4,0.6`, `BYBIT_IP_BAN_SECONDS={BAN_SECONDS}` (Bybit: ten
minutes or more), one worker with two pool processes, each position on an account of its own.

Five-leg baskets (`L1`) with one fault on a leg's `order/create`, then two-leg baskets
(`BLUECHIP`) on accounts in other modes. A 429 or 10016 "taken" is one where the order did
land before the error came back: it is looked up, never sent twice. A 10018 or 403 pauses
every call from the address (in Redis, for every process) until the ban ends, and the next
attempt is scheduled after it. A 10002 makes the client measure the exchange's clock again and
sign anew. Thin books fill in part; the remainder is sent again with its own orderLinkId.

{chr(10).join(lines)}

{
        table(
            [
                ("positions", len(final)),
                ("orders on the exchange", len(orders)),
                ("orders placed twice (same orderLinkId)", duplicate_links(orders)),
                ("positions holding part of a basket", sum(r[4] for r in rows)),
                ("requests sent from the address while it was banned", early),
            ]
        )
    }

The refusal, as the user reads it: "{refused}"
"""
    write_section("exchange-rules", "The real exchange's rules", body)
