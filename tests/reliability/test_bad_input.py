"""Hostile input on both sides: hand-written requests no client should send (huge numbers,
NaN, negative and zero sizes, unicode, deep nesting, invalid UTF-8, oversized bodies, wrong
content types, broken headers) get a clear 4xx, never a 5xx; and malformed exchange replies
on every call a run makes never crash a worker or leave a position unfinished.
(Schemathesis over the OpenAPI schema runs in tests/fuzz, in the same command.)"""

from __future__ import annotations

import json
import os
import random
import secrets
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.config import get_settings
from tests.integration.conftest import api_client, start_worker
from tests.reliability.helpers import duplicate_links, funded_trader, orders_of, wait_final
from tests.reliability.report import table, write_section
from tests.support import ServiceProcess, free_port, wait_for_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]  # long scenarios

JSON = "application/json"
UUID = "6f1c2d3e-0000-4000-8000-000000000000"


def _body(size: object = "1000", index: object = "BLUECHIP", direction: object = "long") -> bytes:
    return json.dumps({"index": index, "size": size, "direction": direction}).encode()


# (label, method, path, body, content type, extra headers)
CASES: list[tuple[str, str, str, bytes | None, str | None, dict[str, Any]]] = [
    *[
        (f"size {label}", "POST", "/api/positions", _body(size=value), JSON, {})
        for label, value in [
            ("1e400", "1e400"),
            ("5000 digits", "1" + "0" * 5000),
            ("NaN", "NaN"),
            ("sNaN", "sNaN"),
            ("Infinity", "Infinity"),
            ("-Infinity", "-Infinity"),
            ("negative", "-100"),
            ("zero", "0"),
            ("negative zero", "-0"),
            ("tiny", "0.000000000000000000001"),
            ("JSON number 1e308", 1e308),
            ("JSON float", 1000.5),
            ("Arabic-Indic digits", "\u0661\u0660\u0660\u0660"),
            ("padded", "  1000  "),
            ("null", None),
            ("list", [1000]),
            ("object", {"v": 1}),
            ("hex", "0x3e8"),
        ]
    ],
    *[
        (f"index {label}", "POST", "/api/positions", _body(index=value), JSON, {})
        for label, value in [
            ("fullwidth", "".join(chr(ord(c) + 0xFEE0) for c in "BLUECHIP")),
            ("emoji", "💥"),
            ("NUL", "BLUE\u0000CHIP"),
            ("SQL", "BLUECHIP' OR '1'='1"),
            ("10,000 chars", "A" * 10_000),
            ("empty", ""),
            ("number", 7),
        ]
    ],
    *[
        (f"direction {label}", "POST", "/api/positions", _body(direction=value), JSON, {})
        for label, value in [("upper case", "LONG"), ("empty", ""), ("null", None)]
    ],
    ("not JSON", "POST", "/api/positions", b"index=BLUECHIP&size=1000", JSON, {}),
    ("JSON array", "POST", "/api/positions", b"[1, 2, 3]", JSON, {}),
    ("JSON string", "POST", "/api/positions", b'"hello"', JSON, {}),
    ("nested 100,000 deep", "POST", "/api/positions", b"[" * 20_000 + b"]" * 20_000, JSON, {}),
    ("invalid UTF-8", "POST", "/api/positions", b'{"index": "\xff\xfe", "size": "1"}', JSON, {}),
    ("empty body", "POST", "/api/positions", b"", JSON, {}),
    ("100 KB body", "POST", "/api/positions", b'{"index": "' + b"A" * 100_000 + b'"}', JSON, {}),
    ("10 MB body", "POST", "/api/positions", b"A" * 10_000_000, JSON, {}),
    ("text/plain", "POST", "/api/positions", _body(), "text/plain", {}),
    ("form", "POST", "/api/positions", b"index=BLUECHIP", "application/x-www-form-urlencoded", {}),
    ("multipart", "POST", "/api/positions", b"--x--", "multipart/form-data; boundary=x", {}),
    ("no content type", "POST", "/api/positions", _body(), None, {}),
    ("latin-1 charset", "POST", "/api/positions", _body(), "application/json; charset=latin-1", {}),
    ("XML", "POST", "/api/positions", b"<position/>", "application/xml", {}),
    (
        "Idempotency-Key 300 chars",
        "POST",
        "/api/positions",
        _body(),
        JSON,
        {"Idempotency-Key": "k" * 300},
    ),
    (
        "Idempotency-Key unicode",
        "POST",
        "/api/positions",
        _body(),
        JSON,
        {"Idempotency-Key": "ключ-💥".encode()},
    ),
    ("Idempotency-Key empty", "POST", "/api/positions", _body(), JSON, {"Idempotency-Key": ""}),
    ("position id not a UUID", "GET", "/api/positions/not-a-uuid", None, None, {}),
    ("position id unicode", "GET", "/api/positions/%F0%9F%92%A5", None, None, {}),
    ("position id 10,000 chars", "GET", "/api/positions/" + "a" * 10_000, None, None, {}),
    (
        "If-None-Match garbage",
        "GET",
        f"/api/positions/{UUID}",
        None,
        None,
        {"If-None-Match": '"' * 500},
    ),
    ("limit -1", "GET", "/api/positions?limit=-1", None, None, {}),
    ("limit 1e9", "GET", "/api/positions?limit=1000000000", None, None, {}),
    ("limit NaN", "GET", "/api/positions?limit=NaN", None, None, {}),
    ("cursor garbage", "GET", "/api/positions?cursor=%00%01garbage", None, None, {}),
    ("cursor valid base64 of junk", "GET", "/api/positions?cursor=AAAAAAAAAAAA", None, None, {}),
    ("status bogus", "GET", "/api/positions?status=BOGUS", None, None, {}),
    (
        "credentials with NUL",
        "PUT",
        "/api/credentials",
        json.dumps({"api_key": "KEY\u0000KEYKEY", "api_secret": "s" * 20}).encode(),
        JSON,
        {},
    ),
    (
        "credentials 1 MB",
        "PUT",
        "/api/credentials",
        json.dumps({"api_key": "K" * 1_000_000, "api_secret": "s"}).encode(),
        JSON,
        {},
    ),
    ("method TRACE", "TRACE", "/api/positions", None, None, {}),
]
AUTH_CASES: list[tuple[str, dict[str, Any]]] = [
    ("Authorization: Bearer (no token)", {"Authorization": "Bearer"}),
    ("Authorization: Basic", {"Authorization": "Basic dXNlcjpwYXNz"}),
    ("Authorization: 10 KB token", {"Authorization": "Bearer " + "t" * 10_000}),
    ("Authorization: unicode token", {"Authorization": "Bearer тест".encode()}),
]

# Malformed replies a broken proxy or a changed API could send, on every call of a run.
BROKEN_REPLIES = [
    ("truncated JSON", '{"retCode":0,"retMsg":"OK","result":{"orderId":"'),
    ("HTML page", "<html><body>Bad Gateway</body></html>"),
    ("JSON array", "[]"),
    ("JSON null", "null"),
    ("retCode as text", '{"retCode":"zero","retMsg":"OK","result":{}}'),
    ("result null", '{"retCode":0,"retMsg":"OK","result":null}'),
    ("list not a list", '{"retCode":0,"retMsg":"OK","result":{"list":"x"}}'),
    (
        "numbers not numbers",
        '{"retCode":0,"retMsg":"OK","result":{"list":[{"symbol":"BTCUSDT",'
        '"lastPrice":"lots","orderStatus":"Filled","cumExecQty":"?","avgPrice":"?"}]}}',
    ),
]
PATHS = [
    "/v5/order/create",
    "/v5/order/realtime",
    "/v5/account/wallet-balance",
    "/v5/position/set-leverage",
]


@pytest.mark.asyncio
async def test_hostile_requests_get_a_clear_4xx(
    service_env: dict[str, str], sim: httpx.AsyncClient, sessions: object, tmp_path: Path
) -> None:
    port = free_port()
    process = ServiceProcess(["api", "--port", str(port)], service_env, tmp_path / "api.log")
    outcomes: Counter[str] = Counter()
    unclear: list[str] = []
    try:
        wait_for_port(port, process.process)
        async with api_client(get_settings()) as in_process:
            user = await funded_trader(sessions, sim, in_process)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as api:
            requests = [
                (label, method, path, body, ctype, {**user.headers, **extra})
                for label, method, path, body, ctype, extra in CASES
            ] + [
                (label, "GET", "/api/positions", None, None, headers)
                for label, headers in AUTH_CASES
            ]
            for label, method, path, body, ctype, headers in requests:
                if ctype:
                    headers = {**headers, "Content-Type": ctype}
                response = await api.request(method, path, content=body, headers=headers)
                outcomes[str(response.status_code)] += 1
                if response.status_code >= 500:
                    unclear.append(f"{label}: {response.status_code}")
                elif response.status_code >= 400:
                    try:
                        detail = response.json().get("detail")
                    except ValueError:
                        detail = None
                    if not detail:
                        unclear.append(f"{label}: {response.status_code} without a message")
        log = process.output()
    finally:
        process.stop()
    tracebacks = log.count("Traceback")
    codes = ", ".join(f"{code}: {n}" for code, n in sorted(outcomes.items()))
    _record_requests(len(CASES) + len(AUTH_CASES), codes, unclear, tracebacks)
    assert not unclear, unclear
    assert tracebacks == 0


@pytest.mark.asyncio
async def test_malformed_exchange_replies_never_crash_a_worker(
    service_env: dict[str, str], sim: httpx.AsyncClient, sessions: object, tmp_path: Path
) -> None:
    rng = random.Random(int(os.environ.get("BAD_REPLY_SEED", "11")))
    worker = start_worker(service_env, tmp_path)
    owners = {}
    injected = []
    try:
        async with api_client(get_settings()) as api:
            for n in range(len(BROKEN_REPLIES) * len(PATHS)):
                name, reply = BROKEN_REPLIES[n % len(BROKEN_REPLIES)]
                path = PATHS[(n // len(BROKEN_REPLIES)) % len(PATHS)]
                user = await funded_trader(sessions, sim, api)
                await sim.post(
                    "/sim/faults",
                    json={
                        "kind": "malformed",
                        "body": reply,
                        "path": path,
                        "api_key": user.api_key,
                        "skip": rng.randrange(2),
                        "times": rng.choice([1, 2]),
                    },
                )
                response = await api.post(
                    "/api/positions",
                    json={"index": "BLUECHIP", "size": "1000", "direction": "long"},
                    headers={**user.headers, "Idempotency-Key": secrets.token_hex(8)},
                )
                assert response.status_code == 202, response.text
                owners[response.json()["id"]] = user
                injected.append((name, path))
            final = await wait_final(api, owners, timeout=240)
            orders = await orders_of(sim, list(owners.values()))
        alive = worker.process.poll() is None
    finally:
        worker.stop()
        await sim.delete("/sim/faults")
    output = worker.output()
    statuses = Counter(p["status"] for p in final.values())
    unexpected = output.count("raised unexpected") + output.count("Traceback")
    _record_replies(len(injected), statuses, alive, unexpected, duplicate_links(orders))
    assert alive
    assert unexpected == 0
    assert statuses["ACTIVE"] + statuses["FAILED"] == len(injected)
    assert duplicate_links(orders) == 0


def _record_requests(count: int, codes: str, unclear: list[str], tracebacks: int) -> None:
    body = f"""
Command: `scripts/dev reliability -k bad_input`.

{count} hand-written requests to the API process (uvicorn) with a valid token unless the
case is about the token: sizes of 1e400, 5,000 digits, NaN, sNaN, Infinity, negative, zero,
-0, JSON floats and 1e308, Arabic-Indic digits, lists and objects; unicode, NUL, SQL and
10,000-character index names; JSON that is not an object, nested 20,000 deep, invalid UTF-8,
empty, 100 KB and 10 MB bodies; text/plain, form, multipart, XML, missing and latin-1 content
types; oversized, unicode and empty Idempotency-Keys; bad ids, limits, cursors and status
filters; NUL and 1 MB credentials; TRACE; malformed Authorization headers.

{
        table(
            [
                ("requests", count),
                ("answers", codes),
                ("5xx, or a 4xx without a message", len(unclear)),
                ("tracebacks in the API's log", tracebacks),
            ]
        )
    }
"""
    write_section("bad-requests", "Bad input: hostile requests", body)


def _record_replies(
    count: int, statuses: Counter[str], alive: bool, unexpected: int, duplicates: int
) -> None:
    body = f"""
{count} two-leg positions, each on its own account, each with malformed replies
({", ".join(name for name, _ in BROKEN_REPLIES)}) injected once or twice on one of
{", ".join(f"`{p}`" for p in PATHS)}, sometimes after one good call.

{
        table(
            [
                ("positions", count),
                ("ended ACTIVE (the retry got a good reply)", statuses["ACTIVE"]),
                ("ended FAILED (with the reason in `error`)", statuses["FAILED"]),
                ("left PENDING or EXECUTING", count - statuses["ACTIVE"] - statuses["FAILED"]),
                ("worker crashed", "no" if alive else "yes"),
                ("unhandled exceptions in the worker's log", unexpected),
                ("extra orders (same orderLinkId twice)", duplicates),
            ]
        )
    }

Command: `scripts/dev reliability -k malformed`.
"""
    write_section("bad-replies", "Bad input: malformed exchange replies", body)
