"""Everything the simulator remembers: instruments, prices, accounts, orders, fills, knobs,
faults and request counts. One SimulatorState per app; `reset()` restores the start."""

from __future__ import annotations

import zlib
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from service.simulator.errors import now_ms
from service.simulator.faults import FaultBook
from service.simulator.instruments import Instrument, load_market
from service.simulator.values import plain, scaled

DEFAULT_LEVERAGE = Decimal(10)  # Bybit's leverage for a symbol the account never set
TAKER_FEE_RATE = Decimal("0.00055")  # Bybit's base taker fee for perpetuals
DEFAULT_BALANCE = Decimal(100_000)
JOURNAL_SIZE = 200_000


MARGIN_MODES = ("REGULAR_MARGIN", "ISOLATED_MARGIN", "PORTFOLIO_MARGIN")


@dataclass
class Position:
    """A position: size > 0 long, < 0 short. `idx` is Bybit's positionIdx: 0 in one-way
    mode; in hedge mode 1 holds the long side and 2 the short side of a symbol."""

    symbol: str
    idx: int = 0
    size: Decimal = Decimal(0)
    avg_price: Decimal = Decimal(0)
    initial_margin: Decimal = Decimal(0)
    cum_realised_pnl: Decimal = Decimal(0)
    created_ms: int = 0
    updated_ms: int = 0
    seq: int = -1

    @property
    def side(self) -> str:
        """Bybit's side of a position: `Buy` long, `Sell` short, `""` empty."""
        return "" if not self.size else "Buy" if self.size > 0 else "Sell"


# query-api's permission groups, in Bybit's order.
PERMISSION_GROUPS = (
    "ContractTrade",
    "Spot",
    "Wallet",
    "Options",
    "Derivatives",
    "CopyTrading",
    "BlockTrade",
    "Exchange",
    "NFT",
    "Affiliate",
)


def default_permissions() -> dict[str, list[str]]:
    """A key that trades contracts and moves funds between its own accounts, nothing more."""
    granted: dict[str, list[str]] = {group: [] for group in PERMISSION_GROUPS}
    granted["ContractTrade"] = ["Order", "Position"]
    granted["Wallet"] = ["AccountTransfer"]
    return granted


@dataclass
class Account:
    api_key: str
    api_secret: str
    wallet_balance: Decimal
    leverage: dict[str, Decimal] = field(default_factory=dict)
    # Keyed by (symbol, positionIdx).
    positions: dict[tuple[str, int], Position] = field(default_factory=dict)
    # Position mode: Bybit sets it per symbol (symbol > coin > default; a switch per coin skips
    # symbols with positions or orders), so modes can be mixed: the default, and overrides.
    hedge_mode: bool = False
    hedge_symbols: dict[str, bool] = field(default_factory=dict)
    margin_mode: str = "REGULAR_MARGIN"
    order_link_ids: set[str] = field(default_factory=set)
    # Accepted private calls per path (ms timestamps), for the rate limit and its headers.
    calls: dict[str, deque[int]] = field(default_factory=dict)
    # Bybit's UID of the account the key belongs to (query-api's userID); by default one per
    # key, or given, to model two keys of one account.
    uid: int | None = None
    # What the key may do, as query-api shows it: read-only or read-write, the permissions
    # by group, the addresses it is bound to (["*"]: none). By default a trade-only key
    # bound to no address. (The simulator shows them; it does not enforce them.)
    read_only: bool = False
    permissions: dict[str, list[str]] = field(default_factory=lambda: default_permissions())
    ips: list[str] = field(default_factory=lambda: ["*"])

    @property
    def user_id(self) -> int:
        return self.uid if self.uid is not None else zlib.crc32(self.api_key.encode()) % 10**9

    def leverage_for(self, symbol: str) -> Decimal:
        return self.leverage.get(symbol, DEFAULT_LEVERAGE)

    def position(self, symbol: str, idx: int = 0) -> Position:
        return self.positions.setdefault((symbol, idx), Position(symbol=symbol, idx=idx))

    def is_hedge(self, symbol: str) -> bool:
        return self.hedge_symbols.get(symbol, self.hedge_mode)

    def positions_of(self, symbol: str) -> list[Position]:
        """The symbol's positions as position/list shows them: one row in one-way mode, one
        per side in hedge mode, empty or not."""
        indices = (1, 2) if self.is_hedge(symbol) else (0,)
        return [self.positions.get((symbol, i)) or Position(symbol, i) for i in indices]

    @property
    def position_margin(self) -> Decimal:
        return sum((p.initial_margin for p in self.positions.values()), Decimal(0))

    def available_balance(self) -> Decimal:
        return self.wallet_balance - self.position_margin


@dataclass
class Order:
    api_key: str
    order_id: str
    order_link_id: str
    symbol: str
    side: str
    qty: Decimal
    cum_exec_qty: Decimal
    cum_exec_value: Decimal
    cum_exec_fee: Decimal
    avg_price: Decimal | None
    order_status: str
    reduce_only: bool
    last_price: Decimal
    created_ms: int
    qty_step: Decimal
    tick_size: Decimal
    order_type: str = "Market"
    # Bybit acknowledges before it fills, and its lists lag: when the order shows in
    # order/realtime at all, when it shows filled (`New` with nothing filled before), and when
    # order/history lists it.
    visible_ms: int = 0
    fill_ms: int = 0
    history_ms: int = 0
    position_idx: int = 0

    def is_open(self, now: int | None = None) -> bool:
        return self.status_at(now) in ("New", "PartiallyFilled")

    def status_at(self, now: int | None) -> str:
        """The status as seen at `now` (None: the final one)."""
        if now is not None and now < self.fill_ms:
            return "New"
        return self.order_status

    def payload(self, now: int | None = None) -> dict[str, Any]:
        """An entry of order/realtime and order/history, as it reads at `now` (None: final)."""
        if now is not None and now < self.fill_ms:
            return self._pending_payload()
        filled = self.order_status == "Filled"
        return {
            "orderId": self.order_id,
            "orderLinkId": self.order_link_id,
            "blockTradeId": "",
            "symbol": self.symbol,
            "price": scaled(self.last_price, self.tick_size),
            "qty": scaled(self.qty, self.qty_step),
            "side": self.side,
            "isLeverage": "",
            "positionIdx": self.position_idx,
            "orderStatus": self.order_status,
            "createType": "CreateByUser",
            "cancelType": "UNKNOWN",
            "rejectReason": "EC_NoError" if filled else "EC_CancelForNoFullFill",
            "avgPrice": scaled(self.avg_price, self.tick_size) if self.avg_price else "",
            "leavesQty": scaled(Decimal(0), self.qty_step),
            "leavesValue": "0",
            "cumExecQty": scaled(self.cum_exec_qty, self.qty_step),
            "cumExecValue": plain(self.cum_exec_value),
            # Deprecated for linear orders in favour of cumFeeDetail (fee coin -> amount).
            "cumExecFee": plain(self.cum_exec_fee),
            "cumFeeDetail": {"USDT": plain(self.cum_exec_fee)} if self.cum_exec_qty else {},
            "timeInForce": "IOC",
            "orderType": self.order_type,
            "stopOrderType": "",
            "orderIv": "",
            "marketUnit": "",
            "triggerPrice": "",
            "takeProfit": "",
            "stopLoss": "",
            "tpslMode": "",
            "ocoTriggerBy": "",
            "tpLimitPrice": "",
            "slLimitPrice": "",
            "tpTriggerBy": "",
            "slTriggerBy": "",
            "triggerDirection": 0,
            "triggerBy": "",
            "lastPriceOnCreated": scaled(self.last_price, self.tick_size),
            "reduceOnly": self.reduce_only,
            "closeOnTrigger": False,
            "placeType": "",
            "smpType": "None",
            "smpGroup": 0,
            "smpOrderId": "",
            "createdTime": str(self.created_ms),
            "updatedTime": str(self.created_ms),
        }

    def _pending_payload(self) -> dict[str, Any]:
        payload = self.payload()
        zero = scaled(Decimal(0), self.qty_step)
        payload.update(
            orderStatus="New",
            rejectReason="EC_NoError",
            avgPrice="",
            leavesQty=scaled(self.qty, self.qty_step),
            leavesValue=plain(self.qty * self.last_price),
            cumExecQty=zero,
            cumExecValue="0",
            cumExecFee="0",
            cumFeeDetail={},
        )
        return payload

    def record(self) -> dict[str, Any]:
        """The admin view (GET /sim/orders): the order as it ends, plus its account."""
        return {"api_key": self.api_key, **self.payload()}


@dataclass
class Execution:
    api_key: str
    exec_id: str
    order_id: str
    order_link_id: str
    symbol: str
    side: str
    exec_price: Decimal
    exec_qty: Decimal
    exec_fee: Decimal
    order_qty: Decimal
    exec_ms: int
    seq: int
    closed_size: Decimal
    qty_step: Decimal
    tick_size: Decimal
    mark_price: Decimal  # the mark when it filled

    def payload(self) -> dict[str, Any]:
        """An entry of execution/list."""
        price = scaled(self.exec_price, self.tick_size)
        return {
            "symbol": self.symbol,
            "orderId": self.order_id,
            "orderLinkId": self.order_link_id,
            "side": self.side,
            "orderPrice": price,
            "orderQty": scaled(self.order_qty, self.qty_step),
            "leavesQty": scaled(Decimal(0), self.qty_step),
            "createType": "CreateByUser",
            "orderType": "Market",
            "stopOrderType": "",
            "execFee": plain(self.exec_fee),
            "execId": self.exec_id,
            "execPrice": price,
            "execQty": scaled(self.exec_qty, self.qty_step),
            "execType": "Trade",
            "execValue": plain(self.exec_qty * self.exec_price),
            "execTime": str(self.exec_ms),
            "feeCurrency": "USDT",
            "isMaker": False,
            "feeRate": plain(TAKER_FEE_RATE),
            "tradeIv": "",
            "markIv": "",
            "markPrice": scaled(self.mark_price, self.tick_size),
            "indexPrice": price,
            "underlyingPrice": "",
            "blockTradeId": "",
            "closedSize": scaled(self.closed_size, self.qty_step),
            "seq": self.seq,
        }


@dataclass
class Config:
    latency_ms: int = 0
    slippage_bps: Decimal = Decimal(0)
    order_rate_limit: int = 10  # order/create calls per second per account; 0 = off
    # order/create-batch: orders (not requests) per second per account, in a window of its
    # own (0 = off); and the most orders one batch may carry (Bybit: 20 for linear).
    batch_rate_limit: int = 10
    batch_max_orders: int = 20
    fill_ratio: Decimal = Decimal(1)
    # The exchange's clock minus the machine's: a skewed host is a client whose clock is
    # off by minus this much.
    clock_offset_ms: int = 0
    # Bybit's limits per account (UID) on every other private endpoint (documented values).
    account_limits: bool = True
    # The IP limit: requests per 5 s from the (one) client address; over it, HTTP 403 for
    # every request until the ban ends. 0 turns it off.
    ip_limit: int = 600
    ip_ban_ms: int = 600_000
    # Injected load: with more private requests in flight than this, retCode 429 ("high
    # server load"). 0 turns it off.
    max_in_flight: int = 0
    # After an order is accepted: when order/realtime lists it, when it shows filled (`New`
    # before), and how far order/history lags behind (milliseconds).
    order_visible_ms: int = 0
    fill_delay_ms: int = 0
    history_lag_ms: int = 0
    # Order queries answer avgPrice "" even for filled orders (Bybit's classic accounts give
    # "0" or "" for some): a client must then price the fill from its executions.
    avg_price_blank: bool = False

    def payload(self) -> dict[str, Any]:
        return {
            "latency_ms": self.latency_ms,
            "slippage_bps": plain(self.slippage_bps),
            "order_rate_limit": self.order_rate_limit,
            "batch_rate_limit": self.batch_rate_limit,
            "batch_max_orders": self.batch_max_orders,
            "fill_ratio": plain(self.fill_ratio),
            "clock_offset_ms": self.clock_offset_ms,
            "account_limits": self.account_limits,
            "ip_limit": self.ip_limit,
            "ip_ban_ms": self.ip_ban_ms,
            "max_in_flight": self.max_in_flight,
            "order_visible_ms": self.order_visible_ms,
            "fill_delay_ms": self.fill_delay_ms,
            "history_lag_ms": self.history_lag_ms,
            "avg_price_blank": self.avg_price_blank,
        }


@dataclass
class SimulatorState:
    instruments: dict[str, Instrument] = field(default_factory=dict)
    # Last prices. The mark follows the last price unless a test moved it on its own: `marks`
    # holds those overrides.
    prices: dict[str, Decimal] = field(default_factory=dict)
    marks: dict[str, Decimal] = field(default_factory=dict)
    accounts: dict[str, Account] = field(default_factory=dict)
    orders: list[Order] = field(default_factory=list)
    executions: list[Execution] = field(default_factory=list)
    faults: FaultBook = field(default_factory=FaultBook)
    config: Config = field(default_factory=Config)
    # What `reset()` returns the knobs to (the command line may change Bybit's defaults).
    defaults: Config = field(default_factory=Config)
    requests: Counter[str] = field(default_factory=Counter)
    # Every /v5 call as it arrived (before latency and faults): what tests check timing with.
    journal: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=JOURNAL_SIZE))
    # Refusals for limits and load, by answer ("10006", "403", "429"): what a client that keeps
    # within the limits never sees.
    refusals: Counter[str] = field(default_factory=Counter)
    # The IP limit's rolling window (arrival times, ms) and the ban it may have caused.
    ip_calls: deque[int] = field(default_factory=deque)
    banned_until_ms: int = 0
    seq: int = 0

    def __post_init__(self) -> None:
        if not self.instruments:
            self.instruments, self.prices = load_market()

    def reset(self) -> None:
        """Back to the start: no accounts, orders or faults, default knobs and market."""
        self.instruments, self.prices = load_market()
        self.marks.clear()
        self.accounts.clear()
        self.orders.clear()
        self.executions.clear()
        self.faults.clear()
        self.config = replace(self.defaults)
        self.requests.clear()
        self.journal.clear()
        self.ip_calls.clear()
        self.refusals.clear()
        self.banned_until_ms = 0
        self.seq = 0

    def add_account(
        self,
        api_key: str,
        api_secret: str,
        balance: Decimal = DEFAULT_BALANCE,
        *,
        hedge_mode: bool = False,
        margin_mode: str = "REGULAR_MARGIN",
        uid: int | None = None,
        key: tuple[bool, dict[str, list[str]], list[str]] | None = None,
    ) -> Account:
        """Create or replace an account with a USDT wallet balance. A replaced account starts
        afresh (balance, leverage, positions) but keeps its orders: an orderLinkId it used is
        never accepted again."""
        account = Account(
            api_key=api_key,
            api_secret=api_secret,
            wallet_balance=balance,
            hedge_mode=hedge_mode,
            margin_mode=margin_mode,
            uid=uid,
        )
        if key is not None:
            account.read_only, account.permissions, account.ips = key
        previous = self.accounts.get(api_key)
        if previous is not None:
            account.order_link_ids = previous.order_link_ids
        self.accounts[api_key] = account
        return account

    def mark_price(self, symbol: str) -> Decimal:
        """The mark price: the override a test set, else the last price."""
        return self.marks.get(symbol, self.prices[symbol])

    def server_ms(self) -> int:
        """Now, by the exchange's clock."""
        return now_ms() + self.config.clock_offset_ms

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq
