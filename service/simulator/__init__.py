"""The Bybit V5 simulator: an independent implementation of Bybit's rules (no service.* imports)."""

from service.simulator.app import STATE_KEY, SimulatorState, create_app, run

__all__ = ["STATE_KEY", "SimulatorState", "create_app", "run"]
