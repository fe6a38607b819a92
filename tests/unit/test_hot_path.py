"""The pieces of the API's hot paths that need no database: the kept bodies, wrk's report."""

from __future__ import annotations

import uuid

from service.positions.hot_path import RenderedPositions
from tests.benchmarks.wrk import parse


def test_a_kept_body_is_served_only_for_its_own_etag() -> None:
    rendered = RenderedPositions(capacity=2)
    first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    rendered.put(first, '"a"', b"first at a")
    assert rendered.get(first, '"a"') == b"first at a"
    assert rendered.get(first, '"b"') is None  # the position moved on: render again
    rendered.put(first, '"b"', b"first at b")
    assert rendered.get(first, '"a"') is None
    rendered.put(second, '"a"', b"second")
    rendered.get(first, '"b"')  # used: the second is now the least recently used
    rendered.put(third, '"a"', b"third")
    assert rendered.get(second, '"a"') is None
    assert rendered.get(first, '"b"') == b"first at b"
    assert rendered.get(third, '"a"') == b"third"


WRK_OUTPUT = """Running 5s test @ http://127.0.0.1:8000/api/positions
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     6.38ms    5.12ms  91.58ms   95.00%
    Req/Sec     1.20k   100.00     1.40k    70.00%
  Latency Distribution
     50%    6.38ms
     75%    7.10ms
     90%    9.00ms
     99%   45.62ms
  11975 requests in 5.00s, 9.80MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 4
Requests/sec:   2395.00
Transfer/sec:      1.96MB
"""


def test_wrk_s_report_is_read_with_its_failures() -> None:
    requests, seconds, p50, p99, unexpected = parse(WRK_OUTPUT)
    assert (requests, seconds, p50, p99) == (11975, 5.0, 6.38, 45.62)
    assert unexpected == 4 + 1 + 2
    assert parse(WRK_OUTPUT.replace("45.62ms", "1.02s"))[3] == 1020.0
    assert parse(WRK_OUTPUT.replace("6.38ms\n     75%", "850.00us\n     75%"))[2] == 0.85
