"""ORM tables, one file per table (or per tight pair), one Base."""

from service.models.base import Base
from service.models.credential import ExchangeCredential
from service.models.index import Index, IndexComponent
from service.models.position import (
    ExecutionMode,
    PlannedLeg,
    PositionCloseLeg,
    PositionCloseRequest,
    PositionLeg,
    PositionStatus,
    SyntheticPosition,
)
from service.models.position_component import PositionComponent
from service.models.reconciliation import ReconciliationIssue
from service.models.trade import Trade
from service.models.user import ApiToken, User

__all__ = [
    "ApiToken",
    "Base",
    "ExchangeCredential",
    "ExecutionMode",
    "Index",
    "IndexComponent",
    "PlannedLeg",
    "PositionCloseLeg",
    "PositionCloseRequest",
    "PositionComponent",
    "PositionLeg",
    "PositionStatus",
    "ReconciliationIssue",
    "SyntheticPosition",
    "Trade",
    "User",
]
