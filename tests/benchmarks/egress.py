"""How many ten-leg baskets per second one egress address sustains within Bybit's limits.

Bybit allows 600 requests in any five seconds per address (a breach bans it for ten minutes
or more) and, per account, 10 orders a second. Every worker asks the shared limiter in Redis
before each call, so adding workers cannot get the address banned: it slows the baskets down
instead. The simulator enforces both limits exactly as Bybit documents them (403 past the IP
limit, 10006 past an account's), and counts every refusal; the figure is the steady rate with
none.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.benchmarks.stack import Stack
from tests.benchmarks.worker_runs import TOP10, _dsn, _post, _sim_calls, _wait_final


def run(stack: Stack, *, baskets: int, workers: int) -> str:
    # Bybit's own limits, and a round trip of 20 ms.
    stack.configure_simulator(
        ip_limit=600, ip_ban_ms=600_000, order_rate_limit=10, account_limits=True, latency_ms=20
    )
    server, url = stack.start_api()
    api = httpx.Client(base_url=url, timeout=10)
    accounts = [stack.new_user() for _ in range(baskets)]
    pool = [stack.start_worker(processes=2) for _ in range(workers)]
    try:
        # One basket per account first: leverage is set once per account and symbol.
        asyncio.run(_wait_final(_dsn(stack), [_post(api, a, TOP10) for a in accounts], 600))
        before = _sim_calls(stack)
        refused_before = _refusals(stack)
        started = time.monotonic()
        ids = [_post(api, account, TOP10) for account in accounts]
        final = asyncio.run(_wait_final(_dsn(stack), ids, 900))
        elapsed = time.monotonic() - started
        after = _sim_calls(stack)
        refused = {k: v - refused_before.get(k, 0) for k, v in _refusals(stack).items()}
    finally:
        for worker in pool:
            worker.stop()
        api.close()
        server.stop()
        stack.configure_simulator(ip_limit=0, order_rate_limit=0, latency_ms=0)
    statuses = [status for status, _ in final.values()]
    assert all(s == "ACTIVE" for s in statuses), statuses
    times = sorted(at for _, at in final.values())
    rate = (len(times) - 1) / (times[-1] - times[0])
    requests = sum(after.values()) - sum(before.values())
    per_basket = requests / baskets
    per_second = requests / elapsed
    return "\n".join(
        [
            "## One egress address: baskets per second within Bybit's limits",
            "",
            f"{baskets} TOP10 baskets (10 legs) on {baskets} accounts, posted at once, worked "
            f"off by {workers} workers of 2 pool processes each; simulator latency 20 ms, "
            "Bybit's limits enforced by the simulator (600 requests per 5 s per address with a "
            "403 ban past it, 10 orders a second per account, the reads at 50). Each account "
            "had one basket before, so its leverage is known.",
            "",
            "| figure | value |",
            "|---|---|",
            f"| baskets ACTIVE | {statuses.count('ACTIVE')} of {baskets} |",
            f"| sustained rate (first to last finished) | {rate:.2f} baskets/s |",
            f"| exchange requests per basket | {per_basket:.1f} (goal at most 10 x 2 + 3 = 23: "
            f"{'met' if per_basket <= 23 else 'not met'}) |",
            f"| requests per second from the address | {per_second:.0f} (Bybit's limit 120, "
            "the service allows itself 90 % of it) |",
            f"| refused with 10006 (an account's limit) | {refused.get('10006', 0)} |",
            f"| refused with HTTP 403 (the IP limit) | {refused.get('403', 0)} |",
            "",
            "The limiter spends the address's budget, not more: at about "
            f"{per_basket:.0f} requests a basket and {0.9 * 120:.0f} requests a second, one "
            f"address carries about {0.9 * 120 / per_basket:.1f} ten-leg baskets a second "
            "however many workers share it (the first-to-last figure above runs a little "
            "higher: the first baskets' requests went out before the first one finished); "
            "more workers beyond that wait for slots instead of getting the address banned.",
            "",
        ]
    )


def _refusals(stack: Stack) -> dict[str, int]:
    response = httpx.get(f"{stack.simulator_url}/sim/requests")
    response.raise_for_status()
    return dict(response.json().get("refusals", {}))
