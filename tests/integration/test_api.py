"""The HTTP API in-process (httpx over ASGI) with the real database and the real broker."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from tests.conftest import TEST_ENV
from tests.integration.conftest import new_user
from tests.support import register_key

pytestmark = [pytest.mark.integration]


@pytest_asyncio.fixture
async def auth(sessions: object) -> dict[str, str]:
    _, token = await new_user(sessions)
    return {"Authorization": f"Bearer {token}"}


async def _store_credentials(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    api_key, api_secret = "KEY" + secrets.token_hex(6), secrets.token_hex(16)
    await register_key(api_key, api_secret)  # a key the exchange knows: PUT checks it
    response = await client.put(
        "/api/credentials",
        json={"api_key": api_key, "api_secret": api_secret},
        headers=auth,
    )
    assert response.status_code == 200, response.text


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}]
)
async def test_missing_or_bad_token_is_401(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    response = await client.post(
        "/api/positions",
        json={"index": "BLUECHIP", "size": "1000", "direction": "long"},
        headers=headers,
    )
    assert response.status_code == 401
    assert "token" in response.json()["detail"]


@pytest.mark.asyncio
async def test_the_token_is_refused_before_the_request_is_found_invalid(
    client: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    invalid = {"index": "BLUECHIP", "size": "-5", "direction": "sideways"}
    for headers in ({}, {"Authorization": "Bearer sit_not-a-token"}):
        for response in (
            await client.post("/api/positions", json=invalid, headers=headers),
            await client.post(
                "/api/positions",
                json={"index": "BLUECHIP", "size": "1000", "direction": "long"},
                headers={**headers, "Idempotency-Key": "k" * 300},
            ),
            await client.get("/api/positions/not-a-uuid", headers=headers),
        ):
            assert response.status_code == 401, response.text
            assert response.headers["WWW-Authenticate"] == "Bearer"
    # With a valid token, the same requests are what is wrong with them.
    assert (await client.post("/api/positions", json=invalid, headers=auth)).status_code == 422
    assert (await client.get("/api/positions/not-a-uuid", headers=auth)).status_code == 422


@pytest.mark.asyncio
async def test_post_writes_pending_and_sends_the_task_after_commit(
    client: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    await _store_credentials(client, auth)
    broker = aioredis.from_url(TEST_ENV["REDIS_URL"])
    queue = TEST_ENV["CELERY_QUEUE"]
    before = await broker.llen(queue)
    response = await client.post(
        "/api/positions",
        json={"index": "BLUECHIP", "size": "250.5", "direction": "long"},
        headers=auth,
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "PENDING"
    assert body["size"] == "250.5"
    assert response.headers["Location"] == f"/api/positions/{body['id']}"
    # No worker consumes this queue in this test: the message is waiting in Redis.
    assert await broker.llen(queue) == before + 1
    message = (await broker.lrange(queue, 0, 0))[0]
    assert body["id"].encode() in message
    await broker.delete(queue)
    await broker.aclose()

    fetched = await client.get(f"/api/positions/{body['id']}", headers=auth)
    assert fetched.status_code == 200
    assert fetched.json()["status"] == "PENDING"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"index": "NOPE", "size": "1000", "direction": "long"}, "unknown index"),
        ({"index": "BLUECHIP", "size": "-5", "direction": "long"}, "greater than 0"),
        ({"index": "BLUECHIP", "size": "0", "direction": "long"}, "greater than 0"),
        ({"index": "BLUECHIP", "size": "abc", "direction": "long"}, "decimal"),
        # Found by the hostile-input scenario: Decimal() reads Arabic-Indic digits.
        ({"index": "BLUECHIP", "size": "\u0661\u0660\u0660\u0660", "direction": "long"}, "decimal"),
        ({"index": "BLUECHIP", "size": "NaN", "direction": "long"}, "finite"),
        ({"index": "BLUECHIP", "size": "1e40", "direction": "long"}, "at most"),
        ({"index": "BLUECHIP", "size": "1000", "direction": "sideways"}, "long"),
        ({"index": "BLUECHIP", "size": "100"}, "direction"),
    ],
)
async def test_bad_input_is_a_clear_422_and_writes_nothing(
    client: httpx.AsyncClient, auth: dict[str, str], body: dict[str, str], fragment: str
) -> None:
    await _store_credentials(client, auth)
    response = await client.post("/api/positions", json=body, headers=auth)
    assert response.status_code == 422, response.text
    assert fragment in response.text
    listed = await client.get("/api/positions", headers=auth)
    assert listed.json()["items"] == []


@pytest.mark.asyncio
async def test_untradeable_sizes_are_refused_with_the_size_that_would_work(
    client: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    await _store_credentials(client, auth)
    small = await client.post(
        "/api/positions",
        json={"index": "BLUECHIP", "size": "10", "direction": "long"},
        headers=auth,
    )
    assert small.status_code == 422
    detail = small.json()["detail"]
    assert "leg 0 (BTCUSDT)" in detail
    assert "minOrderQty" in detail
    assert "smallest size that can be traded is" in detail
    large = await client.post(
        "/api/positions",
        json={"index": "BLUECHIP", "size": "900000000", "direction": "short"},
        headers=auth,
    )
    assert large.status_code == 422
    assert "maxMktOrderQty" in large.json()["detail"]
    assert "largest size" in large.json()["detail"]
    assert (await client.get("/api/positions", headers=auth)).json()["items"] == []


@pytest.mark.asyncio
async def test_without_market_data_the_size_cannot_be_checked_503(
    client: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    from service.market.snapshot import CACHE_KEY

    await _store_credentials(client, auth)
    broker = aioredis.from_url(TEST_ENV["REDIS_URL"])
    await broker.delete(CACHE_KEY)
    await broker.aclose()
    response = await client.post(
        "/api/positions",
        json={"index": "BLUECHIP", "size": "1000", "direction": "long"},
        headers=auth,
    )
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert "market data" in response.json()["detail"]


@pytest.mark.asyncio
async def test_no_credentials_is_refused(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    response = await client.post(
        "/api/positions",
        json={"index": "BLUECHIP", "size": "1000", "direction": "long"},
        headers=auth,
    )
    assert response.status_code == 409
    assert "credentials" in response.json()["detail"]


@pytest.mark.asyncio
async def test_another_users_position_is_404(
    client: httpx.AsyncClient, auth: dict[str, str], sessions: object
) -> None:
    await _store_credentials(client, auth)
    created = await client.post(
        "/api/positions",
        json={"index": "BLUECHIP", "size": "1000", "direction": "long"},
        headers=auth,
    )
    _, other_token = await new_user(sessions)
    response = await client.get(
        created.headers["Location"], headers={"Authorization": f"Bearer {other_token}"}
    )
    assert response.status_code == 404
    assert (await client.get("/api/positions/not-a-uuid", headers=auth)).status_code == 422


@pytest.mark.asyncio
async def test_credentials_are_masked_and_never_echoed(
    client: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    secret = secrets.token_hex(16)
    await register_key("ABCDEFGHIJKLMNOP", secret)
    response = await client.put(
        "/api/credentials", json={"api_key": "ABCDEFGHIJKLMNOP", "api_secret": secret}, headers=auth
    )
    assert response.json()["api_key"] == "ABCD…MNOP"
    assert secret not in response.text
    refused = await client.put(
        "/api/credentials", json={"api_key": "ABCDEFGHIJKLMNOP", "api_secret": "x y"}, headers=auth
    )
    assert refused.status_code == 422
    assert "x y" not in refused.text


@pytest.mark.asyncio
async def test_indices_are_served(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/indices")
    assert response.status_code == 200
    indices = {i["code"]: i for i in response.json()}
    assert "BLUECHIP" in indices
    assert all(isinstance(c["weight"], str) for c in indices["BLUECHIP"]["components"])


@pytest.mark.asyncio
async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        (b"index=BLUECHIP&size=1000", "application/x-www-form-urlencoded", 422),
        (b"not json at all", "application/json", 422),
        (b"", "application/json", 422),
        (b"[1, 2, 3]", "application/json", 422),
        (
            '{"index": "\u00e9\u00e8\U0001f600", "size": "1000", "direction": "long"}'.encode(),
            "application/json",
            422,
        ),
        (b'{"index": "BLUECHIP", "size": 1e400, "direction": "long"}', "application/json", 422),
        (
            b'{"index": "BLUECHIP", "size": "9' + b"9" * 5000 + b'", "direction": "long"}',
            "application/json",
            422,
        ),
        (b'{"index": "BLUECHIP", "size": true, "direction": "long"}', "application/json", 422),
        (
            b'{"index": "BLUECHIP", "size": "1000", "direction": "long", "x": 1}',
            "application/json",
            422,
        ),
        (b'{"index": "' + b"A" * 100_000 + b'"}', "application/json", 413),
    ],
)
async def test_malformed_requests_get_a_clear_4xx(
    client: httpx.AsyncClient,
    auth: dict[str, str],
    content: bytes,
    content_type: str,
    status: int,
) -> None:
    await _store_credentials(client, auth)
    response = await client.post(
        "/api/positions",
        content=content,
        headers={**auth, "Content-Type": content_type},
    )
    assert response.status_code == status, response.text
    assert "detail" in response.json()
    assert (await client.get("/api/positions", headers=auth)).json()["items"] == []


@pytest.mark.asyncio
async def test_an_oversized_body_without_length_is_refused(
    client: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"index": "'
        for _ in range(100):
            yield b"A" * 1024
        yield b'"}'

    response = await client.post(
        "/api/positions",
        content=chunks(),
        headers={**auth, "Content-Type": "application/json"},
    )
    assert response.status_code == 413
