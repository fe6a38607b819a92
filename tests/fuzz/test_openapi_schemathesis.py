"""Schemathesis over the OpenAPI schema of the running API: no answer of 500 or above.

Run with `scripts/dev fuzz` (not part of the test command: it takes a few minutes). The API,
the simulator and the database are the integration tests' own; schemathesis's CLI fuzzes the
API process over HTTP, once without and once with a valid token (so the fuzzing reaches past
the 401), and fails on any 5xx.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.db import create_engine, create_session_factory, scope_for
from service.users.service import create_user_with_token
from tests.support import register_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]  # long scenarios

MAX_EXAMPLES = os.environ.get("FUZZ_EXAMPLES", "100")


@pytest.fixture(scope="session")
def token(seeded_database: str, api_url: str) -> str:
    """A user with credentials stored, so POST /api/positions gets past the first checks."""

    async def make() -> str:
        engine = create_engine(seeded_database, pool_size=1)
        try:
            async with scope_for(create_session_factory(engine))() as session:
                issued = await create_user_with_token(
                    session, f"fuzz-{secrets.token_hex(4)}@example.com"
                )
        finally:
            await engine.dispose()
        return issued.token

    value = asyncio.run(make())
    api_key, api_secret = "FUZZKEY" + secrets.token_hex(4), secrets.token_hex(16)
    asyncio.run(register_key(api_key, api_secret))  # a key the exchange knows: PUT checks it
    httpx.put(
        f"{api_url}/api/credentials",
        json={"api_key": api_key, "api_secret": api_secret},
        headers={"Authorization": f"Bearer {value}"},
        timeout=10,
    ).raise_for_status()
    return value


@pytest.mark.parametrize("authenticated", [False, True])
def test_no_server_errors(api_url: str, token: str, authenticated: bool, tmp_path: Path) -> None:
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{api_url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        MAX_EXAMPLES,
        "--request-timeout",
        "10",
        "--seed",
        os.environ.get("FUZZ_SEED", "20261124"),
        "--report-dir",
        str(tmp_path),
    ]
    if authenticated:
        command += ["--header", f"Authorization: Bearer {token}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1500, check=False)
    print(result.stdout[-5000:])
    _record("with a valid token" if authenticated else "without a token", result.stdout)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]


_runs: dict[str, str] = {}


def _record(label: str, output: str) -> None:
    """The summary lines of schemathesis's report, per run, into docs/reliability.md."""
    summary = [
        line.strip()
        for line in output.splitlines()
        if re.search(r"\d+ generated|\d+ passed|\d+ failed", line)
    ]
    _runs[label] = "<br>".join(summary[-6:]) or "(no summary)"
    from tests.reliability.report import write_section

    rows = "\n".join(f"| {run} | {text} |" for run, text in _runs.items())
    write_section(
        "fuzz",
        "Bad input: schemathesis over the OpenAPI schema",
        f"""
Command: `scripts/dev reliability -k schemathesis` (also `scripts/dev fuzz`;
`FUZZ_EXAMPLES={MAX_EXAMPLES}` examples per operation, seed `FUZZ_SEED`, check
`not_a_server_error`: any 5xx fails the run). The API process is fuzzed over HTTP.

| run | schemathesis summary |
|---|---|
{rows}
""",
    )
