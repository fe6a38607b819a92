"""Metrics after a real run: the worker's (from its pool processes) and the API's."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from service.config import get_settings
from tests.integration.conftest import api_client, start_worker
from tests.support import ApiUser, eventually, free_port, metric_samples

pytestmark = pytest.mark.integration


@pytest.mark.asyncio
async def test_worker_and_api_metrics_after_a_run(
    service_env: dict[str, str],
    tmp_path: Path,
    funded_user: ApiUser,
    sim: httpx.AsyncClient,
) -> None:
    port, api_metrics_port = free_port(), free_port()
    worker = start_worker({**service_env, "WORKER_METRICS_PORT": str(port)}, tmp_path)
    # The API's metrics on their own address, not the public one.
    settings = get_settings().model_copy(update={"api_metrics_port": api_metrics_port})
    try:
        async with api_client(settings) as api:
            await api.put(
                "/api/credentials",
                json={"api_key": funded_user.api_key, "api_secret": funded_user.api_secret},
                headers=funded_user.headers,
            )
            # One position fills; the next fails on its first order with a permanent retCode.
            ok = await api.post(
                "/api/positions",
                json={"index": "BLUECHIP", "size": "2000", "direction": "long"},
                headers=funded_user.headers,
            )

            async def final(url: str) -> str | None:
                status = (await api.get(url, headers=funded_user.headers)).json()["status"]
                return status if status in ("ACTIVE", "FAILED") else None

            assert await eventually(lambda: final(ok.headers["Location"])) == "ACTIVE"
            await sim.post(
                "/sim/faults",
                json={
                    "path": "/v5/order/create",
                    "kind": "retcode",
                    "retCode": 110094,
                    "retMsg": "below minimum",
                    "api_key": funded_user.api_key,
                },
            )
            bad = await api.post(
                "/api/positions",
                json={"index": "BLUECHIP", "size": "2000", "direction": "long"},
                headers=funded_user.headers,
            )
            assert await eventually(lambda: final(bad.headers["Location"])) == "FAILED"
            assert (await api.get("/metrics")).status_code == 404
            async with httpx.AsyncClient() as http:
                scraped = await http.get(f"http://127.0.0.1:{api_metrics_port}/metrics")
            api_metrics = metric_samples(scraped.text)

        async with httpx.AsyncClient() as http:

            async def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
                samples = metric_samples((await http.get(f"http://127.0.0.1:{port}/metrics")).text)
                finished = samples.get(
                    ("trader_positions_finished_total", (("status", "FAILED"),)), 0
                )
                return samples if finished >= 1 else None

            worker_metrics = await eventually(scrape, timeout=20, message="worker metrics")
    finally:
        worker.stop()

    assert worker_metrics[("trader_leg_latency_seconds_count", (("outcome", "filled"),))] >= 2
    assert worker_metrics[("trader_positions_finished_total", (("status", "ACTIVE"),))] >= 1
    assert worker_metrics[("trader_exchange_errors_total", (("reason", "retcode_110094"),))] >= 1
    assert api_metrics[("trader_positions", (("status", "ACTIVE"),))] >= 1
    assert api_metrics[("trader_positions", (("status", "FAILED"),))] >= 1
    assert ("trader_queue_depth", ()) in api_metrics
