"""The Bybit V5 simulator: an independent implementation of Bybit's rules for tests, the dev
stack and benchmarks. It imports nothing from the rest of `service` (above all not the
client's signing), so a bug in one cannot hide behind the same bug in the other."""

from service.simulator.app import STATE_KEY, create_app, run
from service.simulator.state import SimulatorState

__all__ = ["STATE_KEY", "SimulatorState", "create_app", "run"]
