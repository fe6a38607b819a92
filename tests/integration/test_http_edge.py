"""The HTTP edge of the real API process (uvicorn, `python -m service api`): request heads
bounded with a 431 whether they arrive at once or trickle in, memory flat under oversized
heads, keep-alive and pipelining intact, security headers on every answer, no server banner,
/metrics only on its own address."""

from __future__ import annotations

import functools
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support import ServiceProcess, free_port, wait_for_port

pytestmark = pytest.mark.integration

LIMIT = 16384  # MAX_REQUEST_HEADER_BYTES' default


@dataclass
class Api:
    process: ServiceProcess
    port: int
    metrics_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def edge_api(
    service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Api]:
    port, metrics_port = free_port(), free_port()
    env = {**service_env, "API_METRICS_PORT": str(metrics_port)}
    log = tmp_path_factory.mktemp("edge-api") / "api.log"
    process = ServiceProcess(["api", "--port", str(port)], env, log)
    try:
        wait_for_port(port, process.process)
        wait_for_port(metrics_port, process.process)
        yield Api(process, port, metrics_port)
    finally:
        process.stop()


def _connect(api: Api) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", api.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def _head(size: int, path: str = "/healthz") -> bytes:
    """A GET whose line and headers take exactly `size` bytes."""
    start = f"GET {path} HTTP/1.1\r\nHost: edge\r\nX-Pad: ".encode()
    return start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"


def _assert_431(answer: bytes) -> None:
    status, headers, body = _parse(answer)
    assert status == 431, answer[:300]
    assert headers["connection"] == "close"
    assert headers["x-content-type-options"] == "nosniff"
    assert "server" not in headers
    assert json.loads(body) == {"detail": f"request headers larger than {LIMIT} bytes"}


def test_a_large_head_sent_at_once_is_a_431(edge_api: Api) -> None:
    with _connect(edge_api) as sock:
        sock.sendall(_head(64 * 1024))
        _assert_431(_read_answer(sock))


def test_a_head_trickling_in_is_refused_before_it_is_complete(edge_api: Api) -> None:
    head = _head(64 * 1024)
    with _connect(edge_api) as sock:
        sent = 0
        answer = b""
        while sent < len(head):
            sock.sendall(head[sent : sent + 1024])
            sent += 1024
            # Poll for the answer between pieces (no fixed sleep: the deadline is the head).
            sock.settimeout(0.05)
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            finally:
                sock.settimeout(10)
            break
        assert answer, "no answer while the head was being sent"
        assert sent < len(head) // 2, f"answered only after {sent} bytes"
        _assert_431(answer + _read_answer(sock))


def test_a_head_just_under_the_limit_keep_alive_and_pipelining_work(edge_api: Api) -> None:
    with _connect(edge_api) as sock:
        # Two requests in one write (pipelined), the first's head just under the limit.
        sock.sendall(_head(LIMIT - 10) + _head(200))
        sock.settimeout(10)
        received = b""
        deadline = time.monotonic() + 10
        # Both answers whole (a status line may arrive in one read and its body in the next).
        while received.count(b'{"status":"ok"}') < 2 and time.monotonic() < deadline:
            received += sock.recv(65536)
        assert received.count(b"HTTP/1.1 200") == 2, received[:500]
        assert received.count(b'{"status":"ok"}') == 2, received[:500]
        # The connection is still open (keep-alive): a third request on it.
        sock.sendall(_head(300))
        third = b""
        while b'{"status":"ok"}' not in third and time.monotonic() < deadline:
            third += sock.recv(65536)
        assert third.startswith(b"HTTP/1.1 200"), third[:500]


def test_a_pipelined_request_with_an_oversized_head_is_not_served(edge_api: Api) -> None:
    with _connect(edge_api) as sock:
        # The second head begins in the same write as the first request (not counted as it
        # arrives): it is measured from its parsed headers, and refused after the first
        # request's answer.
        sock.sendall(_head(200) + _head(LIMIT + 2000))
        answer = _read_answer(sock)
    first, _, second = answer.partition(b"HTTP/1.1 431")
    assert first.startswith(b"HTTP/1.1 200"), answer[:500]
    assert first.count(b"HTTP/1.1 ") == 1, answer[:500]
    _assert_431(b"HTTP/1.1 431" + second)


def test_memory_stays_flat_under_concurrent_oversized_heads(edge_api: Api) -> None:
    answers: list[bytes] = []

    def flood() -> None:
        with _connect(edge_api) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: edge\r\nX-Big: ")
            piece = b"a" * 65536
            try:
                for _ in range(64):  # 4 MiB of one header
                    sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server gave up on us: what it said is still readable
            answers.append(_read_answer(sock))

    watched = _flood_while_watching(edge_api, [flood] * 20)
    assert len(answers) == 20
    assert all(a.startswith(b"HTTP/1.1 431") for a in answers if a), [a[:40] for a in answers]
    # A client still sending when the server stops draining (LINGER_SECONDS) may be reset
    # before it reads its 431: at least one reads it, none reads anything else.
    assert any(answers)
    grown_mib = watched.grown_mib()
    # Without the bound, 20 x 4 MiB of header would be held at once (80 MiB and more).
    assert grown_mib < 40, f"RSS grew by {grown_mib:.1f} MiB from {watched.before / 1024:.0f} MiB"
    assert max(watched.health_latencies) < 2.0, max(watched.health_latencies)


def test_every_answer_has_the_security_headers_and_no_banner(edge_api: Api) -> None:
    with httpx.Client(base_url=edge_api.url, timeout=5) as http:
        for path, status in (
            ("/healthz", 200),
            ("/api/positions/not-a-uuid", 401),
            ("/nowhere", 404),
        ):
            response = http.get(path)
            assert response.status_code == status, (path, response.text)
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["referrer-policy"] == "no-referrer"
            assert response.headers["x-frame-options"] == "DENY"
            assert "server" not in response.headers
        assert http.get("/api/positions").headers["cache-control"] == "no-store"
        assert http.get("/api/credentials").headers["cache-control"] == "no-store"
        assert http.get("/api/tokens").headers["cache-control"] == "no-store"
        assert "cache-control" not in http.get("/healthz").headers
        # No CORS policy unless origins are set.
        preflight = http.options(
            "/api/positions",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in preflight.headers


def test_metrics_are_served_on_their_own_address_only(edge_api: Api) -> None:
    with httpx.Client(timeout=5) as http:
        assert http.get(f"{edge_api.url}/metrics").status_code == 404
        scraped = http.get(f"http://127.0.0.1:{edge_api.metrics_port}/metrics")
        assert scraped.status_code == 200
        assert "trader_positions" in scraped.text
        assert "trader_queue_depth" in scraped.text
        assert http.get(f"http://127.0.0.1:{edge_api.metrics_port}/docs").status_code == 404


def _chunked_head(path: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()


def test_the_framing_allowance_covers_the_largest_body() -> None:
    from service import api, http_edge

    # A body of MAX_BODY_BYTES in 1-byte chunks ("1\r\na\r\n") is 5 framing bytes a byte.
    assert http_edge.BODY_BYTES == api.MAX_BODY_BYTES
    assert http_edge.FRAMING_ALLOWANCE >= 5 * api.MAX_BODY_BYTES


def test_a_chunked_body_in_many_small_chunks_gets_its_normal_answer(edge_api: Api) -> None:
    body = b'{"index": "BLUECHIP", "size": "1000", "direction": "long"' + b" " * 40_000 + b"}"
    # 1-byte chunks: 200 KB of framing for a 40 KB body, far past the header limit; and a
    # small trailer.
    chunks = b"".join(b"1\r\n" + body[i : i + 1] + b"\r\n" for i in range(len(body)))
    request = _chunked_head("/api/positions") + chunks + b"0\r\nX-Trailer: fine\r\n\r\n"
    with _connect(edge_api) as sock:
        sock.sendall(request)
        received = b""
        deadline = time.monotonic() + 10
        while b"\r\n\r\n" not in received and time.monotonic() < deadline:
            received += sock.recv(65536)
        status, _, _ = _parse(received)
        assert status == 401, received[:300]  # no token: the same answer as with a length
        # Still open (keep-alive), and in step: the next request on it is answered.
        sock.sendall(_head(300))
        while b'{"status":"ok"}' not in received and time.monotonic() < deadline:
            received += sock.recv(65536)
        assert b"HTTP/1.1 200" in received, received[-500:]


def test_memory_stays_flat_under_chunked_requests_with_huge_trailers(edge_api: Api) -> None:
    answers: list[tuple[str, bytes]] = []

    def flood(path: str) -> None:
        with _connect(edge_api) as sock:
            # One body byte, the last chunk, then a trailer that never ends.
            sock.sendall(_chunked_head(path) + b"1\r\na\r\n0\r\nX-T: ")
            piece = b"a" * 65536
            try:
                for _ in range(64):  # 4 MiB of one trailer
                    sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server gave up on us: what it said is still readable
            answers.append((path, _read_answer(sock)))

    # /api/positions reads the body (the app is waiting for its end: answered 431);
    # /healthz answers 405 at once, and the trailer comes after the answer (closed).
    paths = ["/api/positions", "/healthz"] * 10
    watched = _flood_while_watching(edge_api, [functools.partial(flood, p) for p in paths])
    assert len(answers) == 20
    for path, answer in answers:
        if path == "/healthz":
            assert answer.startswith(b"HTTP/1.1 405"), answer[:300]
            assert answer.count(b"HTTP/1.1 ") == 1, answer[:300]
        elif answer:  # or reset before it was read (see the oversized heads' test)
            status, headers, body = _parse(answer)
            assert status == 431, answer[:300]
            assert headers["connection"] == "close"
            assert "chunk framing and trailers" in json.loads(body)["detail"]
    assert any(answer for path, answer in answers if path == "/api/positions")
    grown_mib = watched.grown_mib()
    # Without the bound, 20 x 4 MiB of trailer would be held at once (80 MiB and more).
    assert grown_mib < 40, f"RSS grew by {grown_mib:.1f} MiB from {watched.before / 1024:.0f} MiB"


def test_a_pipelined_chunked_request_with_a_huge_trailer_follows_the_earlier_answer(
    edge_api: Api,
) -> None:
    with _connect(edge_api) as sock:
        sock.sendall(_head(200) + _chunked_head("/api/positions") + b"1\r\na\r\n0\r\nX-T: ")
        try:
            for _ in range(64):  # 4 MiB of one trailer
                sock.sendall(b"a" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server gave up on us: what it said is still readable
        answer = _read_answer(sock)
    first, _, second = answer.partition(b"HTTP/1.1 431")
    assert first.startswith(b"HTTP/1.1 200"), answer[:500]
    assert first.count(b"HTTP/1.1 ") == 1, answer[:500]
    assert second, answer[:500]  # the trailer's request is refused, never left hanging
    assert b"chunk framing and trailers" in second


@dataclass
class _Watched:
    before: int  # the API's RSS (KiB) before the floods
    peak: int
    after: int
    health_latencies: list[float]

    def grown_mib(self) -> float:
        """How far the RSS rose above the baseline at its highest (printed for the log)."""
        print(
            f"RSS {self.before / 1024:.0f} MiB, peak {self.peak / 1024:.0f}, "
            f"after {self.after / 1024:.0f}"
        )
        return (max(self.peak, self.after) - self.before) / 1024


def _flood_while_watching(edge_api: Api, floods: list[Callable[[], None]]) -> _Watched:
    """Warm the API up, take its RSS, run each flood in a thread of its own, and meanwhile ask
    /healthz (at least once) and read the RSS until every flood has ended. A flood that
    raises fails the test."""
    failures: list[BaseException] = []

    def guarded(flood: Callable[[], None]) -> None:
        try:
            flood()
        except BaseException as error:  # reported by the test thread
            failures.append(error)

    with httpx.Client(base_url=edge_api.url, timeout=5) as http:
        for _ in range(50):  # warm up before the baseline
            assert http.get("/healthz").status_code == 200
        before = edge_api.rss_kib()
        threads = [threading.Thread(target=guarded, args=(flood,)) for flood in floods]
        for thread in threads:
            thread.start()
        health_latencies = []
        peak = before
        while True:
            started = time.monotonic()
            assert http.get("/healthz").status_code == 200
            health_latencies.append(time.monotonic() - started)
            peak = max(peak, edge_api.rss_kib())
            if not any(thread.is_alive() for thread in threads):
                break
        for thread in threads:
            thread.join()
        after = edge_api.rss_kib()
        assert http.get("/healthz").status_code == 200
    assert not failures, failures
    return _Watched(before, peak, after, health_latencies)
