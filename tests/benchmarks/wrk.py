"""HTTP load from `wrk` (C, not Python: the load generator must not be the bottleneck nor share
the interpreter's costs). Found on the PATH, or installed from Debian's packages when it is
missing and the benchmark runs as root; the caller prints which.

Each run is closed loop: `connections` keep-alive connections over two wrk threads, each
sending its next request when the answer arrives, for `seconds`, after a warm-up.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

from tests.benchmarks.loadgen import process_cpu_seconds


def find_or_install() -> tuple[str, str]:
    """The wrk binary and a line saying where it came from."""
    found = shutil.which("wrk")
    if found:
        return found, f"`wrk` found at {found} ({_version(found)})"
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "wrk"],
            check=True,
            capture_output=True,
            timeout=600,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        found = shutil.which("wrk")
        if found:
            return found, f"`wrk` installed now from Debian's packages ({_version(found)})"
    raise RuntimeError(
        "the API benchmark needs wrk (a C HTTP load generator): `apt-get install wrk`"
    )


def _version(binary: str) -> str:
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    first = (done.stdout or done.stderr).strip().splitlines()
    return first[0].split(" [")[0] if first else "wrk"


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    unexpected: int  # responses that were not 2xx/3xx, plus socket errors
    server_cpu_ms: float  # the server process's CPU per request

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds


def _lua(
    method: str, body: str, headers: dict[str, str], rotate: tuple[str, list[str]] | None = None
) -> str:
    lines = [f'wrk.method = "{method}"']
    if body:
        lines.append(f"wrk.body = {_lua_string(body)}")
    lines += [f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items()]
    if rotate:
        # One header's value taken in turn from the list, request by request (each wrk
        # thread keeps its own turn): requests of many users, as a real API serves.
        name, values = rotate
        lines += [
            "local values = {" + ", ".join(_lua_string(v) for v in values) + "}",
            "local turn = 0",
            "request = function()",
            "  turn = turn + 1",
            f"  wrk.headers[{_lua_string(name)}] = values[(turn % #values) + 1]",
            "  return wrk.format()",
            "end",
        ]
    return "\n".join(lines) + "\n"


def _lua_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


_DURATION = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * _DURATION[unit]


def parse(output: str) -> tuple[int, float, float, float, int]:
    """(requests, seconds, p50 ms, p99 ms, unexpected) from `wrk --latency` output."""
    done = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if not (done and p50 and p99):
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    seconds = _ms(done.group(2) + done.group(3)) / 1000
    unexpected = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", output))
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if errors:
        unexpected += sum(int(n) for n in errors.groups())
    return int(done.group(1)), seconds, _ms(p50.group(1)), _ms(p99.group(1)), unexpected


def run(
    wrk: str,
    url: str,
    *,
    server_pid: int,
    connections: int,
    seconds: int,
    method: str = "GET",
    body: str = "",
    headers: dict[str, str] | None = None,
    rotate: tuple[str, list[str]] | None = None,
    warmup_seconds: int = 2,
) -> WrkResult:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_lua(method, body, headers or {}, rotate))
    try:
        base = [wrk, "-t", "2", "-c", str(connections), "--latency", "-s", script.name]
        if warmup_seconds:
            subprocess.run(
                [*base, "-d", f"{warmup_seconds}s", url],
                check=True,
                capture_output=True,
                timeout=warmup_seconds + 60,
            )
        cpu_before = process_cpu_seconds(server_pid)
        done = subprocess.run(
            [*base, "-d", f"{seconds}s", "--timeout", "10s", url],
            check=True,
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
        server_cpu = process_cpu_seconds(server_pid) - cpu_before
    finally:
        os.unlink(script.name)
    requests, wall, p50, p99, unexpected = parse(done.stdout)
    return WrkResult(
        requests=requests,
        seconds=wall,
        p50_ms=p50,
        p99_ms=p99,
        unexpected=unexpected,
        server_cpu_ms=server_cpu / max(requests, 1) * 1000,
    )
