"""Executing a position on the exchange, and keeping it honest afterwards.

- `flow`: one run of a position, top to bottom (claim, plan, pre-flight, legs, finish).
- `legs`: the per-leg exchange protocol; `preflight`: the checks before the first order;
  `plan`: the basket's stored plan; `states`: the run's status steps; `accounts`: one basket
  at a time per exchange account; `calls`: the one typed way to call the exchange.
- `run_lock`: the position's and the account's advisory locks and the ownership proof.
- `recovery`: the sweep that re-sends lost and resumes dead runs; `reconciliation`: the
  exchange's record against ours.

Nothing here imports Celery or FastAPI: the worker and the Beat jobs are thin adapters.
"""

from service.execution.deps import ExecutionDeps, RunLease, RunLock
from service.execution.flow import execute_position
from service.execution.legs import trade_values
from service.execution.outcomes import Outcome, RunResult
from service.execution.plan import order_link_id
from service.models.position import remainder_link_id

__all__ = [
    "ExecutionDeps",
    "Outcome",
    "RunLease",
    "RunLock",
    "RunResult",
    "execute_position",
    "order_link_id",
    "remainder_link_id",
    "trade_values",
]
