"""Every retCode Bybit documents for linear (USDT perpetual) trading on a unified account, and
what the service does with it.

Sources, cited per row:
- `errors`: Bybit's V5 error-code page (bybit-exchange/docs, docs/v5/error.mdx, UTA table and
  the HTTP codes), read 2026-11.
- `notes`: ../shared/bybit-v5-notes.md, which records Bybit's own advice for these codes
  (low-latency order-entry docs: look the order up by orderLinkId after 10000/10016 before
  re-sending; 10006 waits for the reset; 10002 resynchronises the clock).
- `pybit`: pybit 5.x's default retry set (`_http_manager.py`), kept for old codes.
- `rate-limit`: Bybit's rate-limit page (10006 per UID and endpoint; the IP limit).

A code missing here is handled as `UNKNOWN`: an order call is looked up by its orderLinkId
first (it may have been taken), and then the leg fails with the code in its error. An unknown
code is never success.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final


class Handling(StrEnum):
    # Will not succeed by trying again: the leg fails.
    PERMANENT = "permanent"
    # Try again later; the request certainly did nothing.
    TRANSIENT = "transient"
    # Try again later; an order may have been taken: look it up before anything is re-sent.
    AMBIGUOUS = "ambiguous"
    # The account's limit for the endpoint: wait for its reset, then send again (placed
    # nothing).
    RATE_LIMITED = "rate_limited"
    # The IP limit: every call from this address waits until the ban ends (10 minutes or more).
    IP_BANNED = "ip_banned"
    # The request's timestamp is outside the window: measure the clock's offset, sign again.
    CLOCK = "clock"
    # 110072: the orderLinkId exists, so the first attempt landed: look it up, never fail.
    DUPLICATE = "duplicate"
    # 110043 on set-leverage: already so.
    NOT_MODIFIED = "not_modified"
    # Not in this table: looked up if it was an order, then permanent.
    UNKNOWN = "unknown"


class Cause(StrEnum):
    """What a permanent refusal is about, for the error class and the user's message."""

    AUTH = "auth"
    BALANCE = "balance"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class RetCode:
    code: int
    handling: Handling
    meaning: str
    source: str
    cause: Cause = Cause.OTHER


def _rows(*rows: RetCode) -> dict[int, RetCode]:
    table = {row.code: row for row in rows}
    assert len(table) == len(rows), "a retCode is listed twice"
    return table


P, T, A = Handling.PERMANENT, Handling.TRANSIENT, Handling.AMBIGUOUS
AUTH, BALANCE = Cause.AUTH, Cause.BALANCE

RETCODES: Final[dict[int, RetCode]] = _rows(
    # -- general (10xxx) and the UTA-wide codes
    RetCode(-1, Handling.CLOCK, "request expired (timestamp)", "errors"),
    RetCode(429, A, "high server load, please retry (an order may have been taken)", "errors"),
    RetCode(-2015, P, "API key expired (spot)", "errors", AUTH),
    RetCode(33004, P, "API key expired (derivatives)", "errors", AUTH),
    RetCode(10000, A, "server timeout", "errors; notes: look the order up"),
    RetCode(10001, P, "request parameter error (e.g. wrong positionIdx, quantity)", "errors"),
    RetCode(10002, Handling.CLOCK, "timestamp outside the recv window", "errors; notes"),
    RetCode(10003, P, "API key invalid (or for another environment)", "errors", AUTH),
    RetCode(10004, P, "signature error (a bug: never retried)", "errors", AUTH),
    RetCode(10005, P, "permission denied for this key", "errors", AUTH),
    RetCode(10006, Handling.RATE_LIMITED, "too many visits: the account's limit", "rate-limit"),
    RetCode(10007, P, "user authentication failed", "errors", AUTH),
    RetCode(10008, P, "common banned: check the account mode", "errors", AUTH),
    RetCode(10009, P, "service restricted in this region", "errors", AUTH),
    RetCode(10010, P, "IP not in the key's whitelist", "errors", AUTH),
    RetCode(10014, P, "invalid duplicate request", "errors"),
    RetCode(10016, A, "server error / busy", "errors; notes: look the order up"),
    RetCode(10017, P, "route not found", "errors"),
    RetCode(10018, Handling.IP_BANNED, "exceeded the IP rate limit", "errors (struck); notes"),
    RetCode(10024, P, "compliance rules triggered", "errors", AUTH),
    RetCode(10027, P, "transactions are banned", "errors", AUTH),
    RetCode(10028, P, "unified accounts only", "errors", AUTH),
    RetCode(10029, P, "symbol not in the whitelist", "errors"),
    RetCode(10429, Handling.RATE_LIMITED, "system-level frequency protection", "errors (WS)"),
    RetCode(100028, P, "not for unified accounts", "errors", AUTH),
    RetCode(30034, T, "(legacy) retried by pybit", "pybit"),
    RetCode(30035, T, "too fast, try later", "errors; pybit"),
    RetCode(30228, P, "no new positions during delisting", "errors"),
    RetCode(130035, T, "(legacy) retried by pybit", "pybit"),
    RetCode(130150, T, "(legacy) retried by pybit", "pybit"),
    # -- derivatives trading (110xxx)
    RetCode(110001, P, "order does not exist", "errors"),
    RetCode(110003, P, "order price outside the permitted range", "errors"),
    RetCode(110004, P, "wallet balance insufficient", "errors", BALANCE),
    RetCode(110005, P, "position status error", "errors"),
    RetCode(110006, P, "assets cannot cover the position margin", "errors", BALANCE),
    RetCode(110007, P, "available balance insufficient", "errors", BALANCE),
    RetCode(110008, P, "order completed or cancelled", "errors"),
    RetCode(110009, P, "too many stop orders", "errors"),
    RetCode(110010, P, "order cancelled", "errors"),
    RetCode(110011, P, "would trigger liquidation", "errors"),
    RetCode(110012, P, "available balance insufficient", "errors", BALANCE),
    RetCode(110013, P, "leverage not allowed at this risk limit", "errors"),
    RetCode(110014, P, "balance insufficient to add margin", "errors", BALANCE),
    RetCode(110015, P, "position in cross margin mode", "errors"),
    RetCode(110017, P, "quantity truncated to zero / reduce-only rule", "errors"),
    RetCode(110018, P, "user id illegal", "errors"),
    RetCode(110019, P, "order id illegal", "errors"),
    RetCode(110020, P, "more than 500 active orders", "errors"),
    RetCode(110021, P, "open-interest position limit", "errors"),
    RetCode(110022, P, "quantity restricted", "errors"),
    RetCode(110023, P, "reduce-only on this contract", "errors"),
    RetCode(110024, P, "position exists: position mode cannot change", "errors"),
    RetCode(110025, P, "position mode not modified", "errors"),
    RetCode(110026, P, "margin mode not modified", "errors"),
    RetCode(110027, P, "margin not modified", "errors"),
    RetCode(110028, P, "open orders: position mode cannot change", "errors"),
    RetCode(110029, P, "hedge mode not supported for this symbol", "errors"),
    RetCode(110031, P, "risk limit info does not exist", "errors"),
    RetCode(110032, P, "order illegal", "errors"),
    RetCode(110033, P, "margin cannot be set without a position", "errors"),
    RetCode(110034, P, "no net position", "errors"),
    RetCode(110035, P, "cancellation not done before liquidation", "errors"),
    RetCode(110036, P, "cross margin: leverage cannot change", "errors"),
    RetCode(110037, P, "symbol not in the user's settings", "errors"),
    RetCode(110038, P, "portfolio margin: leverage cannot change", "errors"),
    RetCode(110039, P, "maintenance margin rate too high", "errors"),
    RetCode(110040, P, "order would trigger liquidation", "errors"),
    RetCode(110041, P, "skip liquidation not allowed", "errors"),
    RetCode(110042, P, "pre-delivery: reduce only", "errors"),
    RetCode(110043, Handling.NOT_MODIFIED, "set leverage not modified (already so)", "errors"),
    RetCode(110044, P, "available margin insufficient", "errors", BALANCE),
    RetCode(110045, P, "wallet balance insufficient", "errors", BALANCE),
    RetCode(110046, P, "would trigger liquidation", "errors"),
    RetCode(110047, P, "risk limit: margin insufficient", "errors", BALANCE),
    RetCode(110048, P, "risk limit: position value too large", "errors"),
    RetCode(110049, P, "tick notes must be numbers", "errors"),
    RetCode(110050, P, "invalid coin", "errors"),
    RetCode(110051, P, "balance cannot cover the lowest price", "errors", BALANCE),
    RetCode(110052, P, "balance insufficient to set the price", "errors", BALANCE),
    RetCode(110053, P, "balance cannot cover the price", "errors", BALANCE),
    RetCode(110054, P, "TP/SL mode cannot change (take profit)", "errors"),
    RetCode(110055, P, "TP/SL mode cannot change (stop loss)", "errors"),
    RetCode(110056, P, "TP/SL mode cannot change (trailing stop)", "errors"),
    RetCode(110057, P, "TP/SL parameters on a conditional or limit order", "errors"),
    RetCode(110058, P, "position too small for TP/SL", "errors"),
    RetCode(110059, P, "TP/SL of a partly filled order", "errors"),
    RetCode(110060, P, "TP/SL under full mode", "errors"),
    RetCode(110061, P, "more than 20 TP/SLs", "errors"),
    RetCode(110062, P, "no MMP information", "errors"),
    RetCode(110063, T, "settlement in progress: not tradeable now", "errors; notes"),
    RetCode(110064, P, "modified quantity below the filled quantity", "errors"),
    RetCode(110065, P, "MMP not enabled", "errors"),
    RetCode(110066, T, "trading is currently not allowed", "errors; notes"),
    RetCode(110067, P, "unified account not supported", "errors", AUTH),
    RetCode(110068, P, "leveraged trading not allowed", "errors", AUTH),
    RetCode(110069, P, "institutional lending customer may not trade", "errors", AUTH),
    RetCode(110070, P, "ETP symbols cannot be traded", "errors"),
    RetCode(110071, P, "unified margin account being revamped", "errors"),
    RetCode(110072, Handling.DUPLICATE, "orderLinkId is duplicate", "errors; notes"),
    RetCode(110073, P, "set margin mode failed", "errors"),
    RetCode(110074, P, "contract not live", "errors"),
    RetCode(110076, P, "auto-add-margin: isolated only", "errors"),
    RetCode(110077, P, "not supported in portfolio margin", "errors"),
    RetCode(110078, P, "added margin above the maximum", "errors"),
    RetCode(110079, A, "order processing: try again later", "errors; notes"),
    RetCode(110080, P, "institutional lending LTV at liquidation", "errors"),
    RetCode(110082, P, "no reduce-only restriction to lift", "errors"),
    RetCode(110083, P, "reduce-only: lift both sides together", "errors"),
    RetCode(110085, P, "risk limit and margin ratio updated: place again", "errors"),
    RetCode(110086, P, "leverage above the risk-limit tier's maximum", "errors"),
    RetCode(110087, P, "leverage above the institutional loan's maximum", "errors"),
    RetCode(110088, P, "upgrade to UTA to trade", "errors", AUTH),
    RetCode(110089, P, "exceeds the maximum risk limit level", "errors"),
    RetCode(110090, P, "position may exceed the limit at this leverage", "errors"),
    RetCode(110092, P, "trigger price below current (rising)", "errors"),
    RetCode(110093, P, "trigger price above current (falling)", "errors"),
    RetCode(110094, P, "order value below the minimum notional", "errors"),
    RetCode(110095, P, "call auction: no market orders", "errors"),
    RetCode(110096, P, "pre-market: no portfolio margin", "errors"),
    RetCode(110097, P, "pre-market: UTA only", "errors", AUTH),
    RetCode(110098, P, "call auction: GTC only", "errors"),
    RetCode(110099, P, "call auction: no TP/SL", "errors"),
    RetCode(110100, P, "pre-market: not in demo trading", "errors"),
    RetCode(110101, P, "inverse: settlement asset not collateral", "errors"),
    RetCode(110102, P, "inverse contracts not supported for this user", "errors"),
    RetCode(110103, P, "post-only orders only at this stage", "errors"),
    RetCode(110104, P, "institutional loan LTV: no inverse opening", "errors"),
    RetCode(110105, P, "institutional loan LTV: no inverse trading", "errors"),
    RetCode(110106, P, "institutional loan: inverse not whitelisted", "errors"),
    RetCode(110107, P, "institutional loan: inverse leverage limit", "errors"),
    RetCode(110108, P, "allowed range 1 to 10000 ticks", "errors"),
    RetCode(110109, P, "allowed range 0.01 % to 10 %", "errors"),
    RetCode(110110, P, "spread trading: not in isolated margin", "errors"),
    RetCode(110111, P, "spread trading: upgrade UTA", "errors"),
    RetCode(110112, P, "spread trading: not for copy trading", "errors"),
    RetCode(110113, P, "spread trading: not in hedge mode", "errors"),
    RetCode(110114, T, "a spread order is in progress: try later", "errors"),
    RetCode(110115, P, "cancel a combo leg through the combo", "errors"),
    RetCode(110116, P, "combo leg price beyond the limit", "errors"),
    RetCode(110117, P, "modify a combo leg through the combo", "errors"),
    RetCode(110118, T, "no market price: liquidity too low now", "errors"),
    RetCode(110119, P, "RPI orders for approved makers only", "errors"),
    RetCode(110120, P, "order price below the limit", "errors"),
    RetCode(110121, P, "order price above the limit", "errors"),
    RetCode(110123, P, "the trading terms must be agreed", "errors", AUTH),
    RetCode(110124, P, "cooling-off period in effect", "errors", AUTH),
    RetCode(110125, P, "the contract's trading terms must be agreed", "errors", AUTH),
    RetCode(110131, P, "margin limit under the LTV constraints", "errors", BALANCE),
    RetCode(110132, P, "product not available in this region", "errors", AUTH),
    RetCode(110135, P, "event futures held: not in portfolio margin", "errors"),
    RetCode(110136, P, "event futures: whitelisted accounts only", "errors"),
    RetCode(110137, P, "event futures: reduce-only window", "errors"),
    RetCode(170131, P, "insufficient balance (spot)", "notes", BALANCE),
    RetCode(170346, P, "settle coin is not collateral", "errors"),
)


def lookup(code: int) -> RetCode:
    """The row for `code`; an undocumented code is UNKNOWN, never success."""
    found = RETCODES.get(code)
    if found is not None:
        return found
    return RetCode(code, Handling.UNKNOWN, "not in Bybit's documented codes", "none")
