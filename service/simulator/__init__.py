"""The Bybit V5 simulator: an independent implementation of Bybit's rules (category linear)
for the tests, the dev stack and the benchmarks. It imports only the standard library and
aiohttp, nothing from the rest of `service` (above all not the client's signing), so a bug in
one cannot hide behind the same bug in the other. docs/simulator.md describes it."""

from service.simulator.app import create_app, run
from service.simulator.keys import STATE_KEY
from service.simulator.state import SimulatorState

__all__ = ["STATE_KEY", "SimulatorState", "create_app", "run"]
