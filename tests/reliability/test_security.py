"""Nobody reaches what is not theirs, and no secret leaks: a cross-user matrix over every
endpoint, revoked tokens, a credential key rotation while trades run, and a scan of every
log line, every response and the whole database of the run for keys, secrets, tokens and
signatures."""

from __future__ import annotations

import asyncio
import re
import secrets
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.devservices import EmbeddedPostgres, embedded_postgres_bin
from service.security import generate_key_pair
from tests.conftest import CREDENTIALS_PAIR, PG_HOST, PG_PORT, SERVICES, TEST_DATABASE
from tests.integration.conftest import start_worker
from tests.reliability.helpers import duplicate_links, funded_trader, orders_of, wait_final
from tests.reliability.report import table, write_section
from tests.support import ApiUser, ServiceProcess, free_port, run_command, wait_for_port

# The dump tool of the server the run uses: the embedded one's when it started one.
PG_DUMP = (
    str(embedded_postgres_bin() / "pg_dump")
    if any(isinstance(server, EmbeddedPostgres) for server in SERVICES.started)
    else "pg_dump"
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]  # long scenarios

TOP10 = {"index": "TOP10", "size": "5000", "direction": "long"}
# A signature is an HMAC-SHA256 in hex; nothing else we log is 64 hex characters long.
SIGNATURE = re.compile(r"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])")


class RecordingClient:
    """The API client of the scenario: keeps every response body for the leak scan."""

    def __init__(self, base_url: str) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, timeout=15)
        self.bodies: list[str] = []

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = await self.http.request(method, path, **kwargs)
        self.bodies.append(f"{dict(response.headers)!r} {response.text}")
        return response

    async def put(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("PUT", path, **kwargs)


@pytest.mark.asyncio
async def test_no_cross_user_access_and_no_secret_anywhere(
    service_env: dict[str, str], sim: httpx.AsyncClient, sessions: object, tmp_path: Path
) -> None:
    old, new = CREDENTIALS_PAIR, generate_key_pair()
    old_key, new_key = old.private_key, new.private_key
    # Steps 1 and 2 of a rotation: the workers open with "new,old", the API seals for the new
    # public key (ServiceProcess gives the API no private key): the whole run uses them.
    env = {
        **service_env,
        "CREDENTIALS_PRIVATE_KEYS": f"{new_key},{old_key}",
        "CREDENTIALS_PUBLIC_KEY": new.public_key,
    }
    port = free_port()
    processes = [ServiceProcess(["api", "--port", str(port)], env, tmp_path / "api.log")]
    wait_for_port(port, processes[0].process)
    processes.append(start_worker(env, tmp_path))
    await sim.put("/sim/config", json={"latency_ms": 30, "order_rate_limit": 0})
    api = RecordingClient(f"http://127.0.0.1:{port}")
    cli_output: list[str] = []
    try:
        traders = [await funded_trader(sessions, sim, api) for _ in range(5)]
        intruder = await funded_trader(sessions, sim, api)
        revoked_user = await funded_trader(sessions, sim, api)
        users = [*traders, intruder, revoked_user]
        owner = traders[0]
        owners: dict[str, ApiUser] = {}
        for n in range(20):
            user = traders[n % len(traders)]
            response = await api.request("POST", "/api/positions", json=TOP10, headers=user.headers)
            assert response.status_code == 202, response.text
            owners[response.json()["id"]] = user
        # Step 3 while the positions execute: re-seal every stored credential.
        rotated = run_command(env, "credentials", "rotate")
        cli_output.append(rotated.stdout + rotated.stderr)

        # Cross-user matrix: the intruder on each of the owner's positions and credentials.
        mine = [pid for pid, u in owners.items() if u is owner]
        attempts: Counter[str] = Counter()
        leaks: list[str] = []
        for position_id in mine:
            for method, path, headers in (
                ("GET", f"/api/positions/{position_id}", {}),
                ("GET", f"/api/positions/{position_id}", {"If-None-Match": "*"}),
                ("DELETE", f"/api/positions/{position_id}", {}),
                ("PUT", f"/api/positions/{position_id}", {}),
            ):
                response = await api.request(method, path, headers={**intruder.headers, **headers})
                attempts[f"{method} another user's position"] += 1
                # The 404 names the id the intruder sent; a leak would carry the position.
                if response.status_code not in (404, 405) or '"index"' in response.text:
                    leaks.append(f"{method} {path}: {response.status_code}")
        listing = await api.request("GET", "/api/positions?limit=100", headers=intruder.headers)
        attempts["GET the position list"] += 1
        if any(pid in listing.text for pid in mine):
            leaks.append("the intruder's list shows the owner's positions")
        seen = await api.request("GET", "/api/credentials", headers=intruder.headers)
        attempts["GET /api/credentials"] += 1
        if owner.api_key[:4] in seen.text and owner.api_key[-4:] in seen.text:
            leaks.append("the intruder sees the owner's key hint")
        await api.request("DELETE", "/api/credentials", headers=intruder.headers)
        attempts["DELETE /api/credentials (own only)"] += 1
        still = await api.request("GET", "/api/credentials", headers=owner.headers)
        if still.status_code != 200:
            leaks.append("the intruder's DELETE removed the owner's credentials")

        # Without a token, with a made-up one, and after revocation: 401 everywhere.
        refused: Counter[str] = Counter()
        endpoints = [
            ("GET", f"/api/positions/{mine[0]}", None),
            ("GET", "/api/positions", None),
            ("POST", "/api/positions", TOP10),
            ("GET", "/api/credentials", None),
            ("PUT", "/api/credentials", {"api_key": "X" * 12, "api_secret": "Y" * 16}),
            ("DELETE", "/api/credentials", None),
        ]
        revoked = run_command(env, "users", "revoke", revoked_user.email)
        cli_output.append(revoked.stdout + revoked.stderr)
        for label, headers in (
            ("no token", {}),
            ("made-up token", {"Authorization": "Bearer sit_" + secrets.token_urlsafe(32)}),
            ("revoked token", revoked_user.headers),
        ):
            for method, path, body in endpoints:
                response = await api.request(method, path, json=body, headers=headers)
                refused[f"{label}: {response.status_code}"] += 1

        final = await wait_final(api.http, owners, timeout=240)  # type: ignore[arg-type]
        orders = await orders_of(sim, users)
    finally:
        await sim.put("/sim/config", json={"latency_ms": 0, "order_rate_limit": 10})
        for process in reversed(processes):
            process.stop()
        await api.http.aclose()

    # Every stored credential now opens with the new key alone (step 4 drops the old one).
    from sqlalchemy import select

    from service.models import ExchangeCredential
    from service.security import CredentialOpener, parse_private_keys

    only_new = CredentialOpener(parse_private_keys(new_key))
    async with sessions() as session:  # type: ignore[operator]
        rows = (await session.execute(select(ExchangeCredential))).scalars().all()
    undecryptable = 0
    for row in rows:
        try:
            only_new.open(row.api_secret_encrypted)
        except Exception:
            undecryptable += 1

    # The leak scan: logs of every process, every response, the whole database.
    dump = await asyncio.to_thread(
        subprocess.run,
        [PG_DUMP, "-h", PG_HOST, "-p", PG_PORT, "-U", "postgres", "--data-only", TEST_DATABASE],
        capture_output=True,
        text=True,
        check=True,
    )
    logs = "".join(p.output() for p in processes) + "".join(cli_output)
    places = {"log lines": logs, "responses": "\n".join(api.bodies), "database": dump.stdout}
    secrets_of = {
        "API key": [u.api_key for u in users],
        "API secret": [u.api_secret for u in users],
        "bearer token": [u.token for u in users],
        "credentials private key": [old_key, new_key],
    }
    found: list[str] = []
    for place, text in places.items():
        for kind, values in secrets_of.items():
            for value in values:
                if value in text:
                    found.append(f"{kind} in {place}")
    signatures = len(SIGNATURE.findall(logs)) + len(SIGNATURE.findall("\n".join(api.bodies)))
    log_lines = logs.count("\n")
    statuses = Counter(p["status"] for p in final.values())
    refused_rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(refused.items()))
    attempt_rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(attempts.items()))
    body = f"""
Command: `scripts/dev reliability -k secret`. Worker processes with
`CREDENTIALS_PRIVATE_KEYS=new,old`, the API with the new `CREDENTIALS_PUBLIC_KEY` only;
5 users, 20 ten-leg positions (simulator latency 30 ms);
`python -m service credentials rotate` runs while they execute; then one user tries every
endpoint on another's positions and credentials, and a third user's token is revoked with
`python -m service users revoke`.

Another user's resources (each must be 404, or 405 for a method that does not exist, and
never show the position):

| attempt | times |
|---|---|
{attempt_rows}

Requests without a valid token (the 6 authenticated endpoints each):

| token: answer | requests |
|---|---|
{refused_rows}

{
        table(
            [
                ("cross-user reads or changes that succeeded or leaked", len(leaks)),
                (
                    "positions ACTIVE after the key rotation mid-run",
                    f"{statuses['ACTIVE']} of {len(final)}",
                ),
                ("credentials left undecryptable with the new key alone", undecryptable),
                ("extra orders (same orderLinkId twice)", duplicate_links(orders)),
                ("log lines scanned (API, worker, CLI)", log_lines),
                ("responses scanned", len(api.bodies)),
                ("database dump scanned (pg_dump --data-only)", f"{len(dump.stdout) // 1024} KiB"),
                ("keys, secrets, tokens or encryption keys found in clear", len(found)),
                ("64-hex strings (HMAC signatures) in logs or responses", signatures),
            ]
        )
    }
"""
    write_section("security", "Security: other users, tokens, rotation, secrets", body)
    assert not leaks, leaks
    assert all(k.endswith(": 401") for k in refused), refused
    assert statuses["ACTIVE"] == len(final)
    assert undecryptable == 0
    assert not found, found
    assert signatures == 0
    assert duplicate_links(orders) == 0
