"""Operations endpoints and the edge's settings, on the app in-process (real database and
Redis): the docs switch, CORS from settings, /readyz without exception names, /metrics on its
own port with its counts read once for many scrapes, forged pagination cursors."""

from __future__ import annotations

import asyncio
import base64
import uuid

import httpx
import pytest

from service.config import Settings, get_settings
from tests.integration.conftest import api_client, new_user
from tests.support import free_port, metric_samples

pytestmark = pytest.mark.integration


def _settings(**changes: object) -> Settings:
    # The metrics server off unless a test asks for it (the default port is shared).
    return get_settings().model_copy(update={"api_metrics_port": 0, **changes})


@pytest.mark.asyncio
@pytest.mark.parametrize("enabled", [True, False])
async def test_the_interactive_docs_follow_their_setting(
    seeded_database: str, enabled: bool
) -> None:
    async with api_client(_settings(api_docs_enabled=enabled)) as client:
        for path in ("/docs", "/redoc", "/openapi.json"):
            response = await client.get(path)
            assert response.status_code == (200 if enabled else 404), path
        assert (await client.get("/healthz")).status_code == 200


@pytest.mark.asyncio
async def test_cors_answers_only_the_configured_origins(seeded_database: str) -> None:
    origin = "https://app.example"
    async with api_client(_settings(cors_allow_origins=(origin,))) as client:
        preflight = await client.options(
            "/api/positions",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,idempotency-key,content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == origin
        allowed = preflight.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed
        assert "idempotency-key" in allowed
        assert preflight.headers["x-content-type-options"] == "nosniff"
        answer = await client.get("/api/positions", headers={"Origin": origin})
        assert answer.headers["access-control-allow-origin"] == origin
        exposed = answer.headers["access-control-expose-headers"].lower()
        assert {"etag", "location", "retry-after"} <= {h.strip() for h in exposed.split(",")}
        stranger = await client.options(
            "/api/positions",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in stranger.headers


@pytest.mark.asyncio
async def test_readyz_says_unavailable_without_naming_the_exception(seeded_database: str) -> None:
    down = _settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with api_client(down) as client:
        ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"ready": False, "checks": {"database": "ok", "broker": "unavailable"}}
    assert "Error" not in ready.text


@pytest.mark.asyncio
async def test_metrics_on_their_own_port_and_counts_read_once_for_many_scrapes(
    seeded_database: str,
) -> None:
    port = free_port()
    settings = _settings(api_metrics_port=port, metrics_counts_cache_seconds=600)
    async with api_client(settings) as client:
        assert (await client.get("/metrics")).status_code == 404
        server = client._transport.app.state.metrics_server  # type: ignore[attr-defined]
        async with httpx.AsyncClient(timeout=10) as http:
            scrapes = await asyncio.gather(
                *(http.get(f"http://127.0.0.1:{port}/metrics") for _ in range(20))
            )
            again = await http.get(f"http://127.0.0.1:{port}/metrics")
        assert all(s.status_code == 200 for s in [*scrapes, again])
        # Twenty scrapes at once share one count; the next within the cache's age, none.
        assert server.counts.reads == 1
        assert ("trader_queue_depth", ()) in metric_samples(again.text)
        assert "# TYPE trader_positions gauge" in again.text


def _cursor(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


@pytest.mark.asyncio
async def test_a_forged_cursor_is_a_422(seeded_database: str, sessions: object) -> None:
    _, token = await new_user(sessions)
    headers = {"Authorization": f"Bearer {token}"}
    some_id = str(uuid.uuid4())
    forged = [
        _cursor(f"0001-01-01T00:00:00+14:00|{some_id}"),  # out of range once in UTC
        _cursor(f"9999-12-31T23:59:59.999999-14:00|{some_id}"),
        _cursor(f"2024-01-01T00:00:00|{some_id}"),  # no offset
        _cursor(f"{'9' * 40}|{some_id}"),
        _cursor("2024-01-01T00:00:00+00:00|not-a-uuid"),
        _cursor("2024-01-01T00:00:00+00:00"),
        "not base64 at all!",
        "%%%%",
        "\u00e9t\u00e9",
        base64.urlsafe_b64encode(b"\xff\xfe\x00|").decode(),
    ]
    async with api_client(_settings()) as client:
        for cursor in forged:
            response = await client.get(
                "/api/positions", params={"cursor": cursor}, headers=headers
            )
            assert response.status_code == 422, (cursor, response.text)
            assert "cursor" in response.json()["detail"]
        # The edges of the range that are valid are just an empty page.
        for edge in ("0001-01-01T00:00:00+00:00", "9999-12-31T23:59:59.999999+00:00"):
            response = await client.get(
                "/api/positions", params={"cursor": _cursor(f"{edge}|{some_id}")}, headers=headers
            )
            assert response.status_code == 200, (edge, response.text)
            assert response.headers["cache-control"] == "no-store"


@pytest.mark.asyncio
async def test_a_failed_statement_shows_no_parameters(seeded_database: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    from service.db import create_engine
    from service.redaction import Redactor

    engine = create_engine(seeded_database, pool_size=1)
    try:
        async with engine.connect() as connection:
            with pytest.raises(DBAPIError) as failed:
                # A value the driver cannot encode: asyncpg names it in its own message.
                await connection.execute(text("SELECT CAST(:v AS int)"), {"v": "Zqsecret0000"})
    finally:
        await engine.dispose()
    shown = str(failed.value)
    assert "SQL parameters hidden" in shown
    # What is left (the driver's own words) is removed from a logged traceback.
    assert "Zqsecret0000" not in Redactor([]).scrub_text(shown)
