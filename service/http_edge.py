"""The HTTP edge: what every request meets before the app does.

- `EdgeHttpProtocol`: uvicorn's httptools protocol with the request line and headers bounded
  (MAX_REQUEST_HEADER_BYTES): past the bound, 431 and the connection is closed, whether the
  head arrives in one write or trickles in. httptools keeps a header's value in its own buffer
  until the value is complete and only then calls back, so the bytes are counted as they are
  received, before they reach the parser: a connection holds at most the bound plus one read.
  What a message sends after its head besides its body (chunk sizes and extensions, line ends,
  trailers: httptools buffers a trailer like a header) is bounded too (FRAMING_ALLOWANCE).
- `SecurityHeaders`: headers every answer carries (pure ASGI, precomputed lists).
- `cors_options`: Starlette's CORSMiddleware options for the origins in CORS_ALLOW_ORIGINS.
"""

from __future__ import annotations

import asyncio
import json
from functools import lru_cache
from typing import TYPE_CHECKING, Any, cast

import httptools
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from service.config import get_settings
from service.logging import get_logger

if TYPE_CHECKING:
    from uvicorn._types import ASGI3Application

logger = get_logger("service.http_edge")

# Every answer: no MIME sniffing, no referrer sent on, never framed.
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)
# Answers that carry a user's data (credentials, positions, tokens): no cache may keep them.
# A client polling a position still sends the ETag it got (If-None-Match) and gets a 304.
NO_STORE: tuple[bytes, bytes] = (b"cache-control", b"no-store")
NO_STORE_PREFIXES: tuple[str, ...] = ("/api/credentials", "/api/positions", "/api/tokens")

# After a 431 the connection is half-closed and what the client still sends is read and
# dropped for this long: closing at once, with its data unread, would make the kernel reset
# the connection and the client could lose the answer.
LINGER_SECONDS = 2.0

# After a head, the bytes of a message that are not its body: chunk framing and trailers.
# A legitimate body is at most service/api.py's MAX_BODY_BYTES (64 KiB; larger ones get a 413,
# and uvicorn still reads the rest); sent in 1-byte chunks it costs 5 framing bytes per body
# byte ("1\r\na\r\n"), so 6 per byte leaves room for short chunk extensions. Past the header
# limit plus this, the message is cut off: a connection holds at most that plus two reads
# (the read in which the head ends is not counted), 0.9 MiB, whatever the client sends.
BODY_BYTES = 64 * 1024  # service/api.py MAX_BODY_BYTES (kept equal by a test)
FRAMING_ALLOWANCE = 6 * BODY_BYTES


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every answer, and `Cache-Control: no-store` (in place of any
    other) under NO_STORE_PREFIXES. Installed outside every other middleware (see
    service/api.py), so that error answers carry them too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._common = list(SECURITY_HEADERS)
        self._private = [*SECURITY_HEADERS, NO_STORE]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        private = scope["path"].startswith(NO_STORE_PREFIXES)
        extra = self._private if private else self._common

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers") or ()
                if private:
                    headers = [h for h in headers if h[0].lower() != b"cache-control"]
                # A new list: the response object may own the one it sent.
                message["headers"] = [*headers, *extra]
            await send(message)

        await self.app(scope, receive, with_headers)


def cors_options(origins: tuple[str, ...]) -> dict[str, Any]:
    """What a browser frontend on one of `origins` may do: the API's methods and request
    headers, and read the headers it answers with. Bearer tokens, no cookies: no
    credentials mode."""
    return {
        "allow_origins": list(origins),
        "allow_methods": ["GET", "POST", "PUT", "DELETE"],
        "allow_headers": ["Authorization", "Content-Type", "Idempotency-Key", "If-None-Match"],
        "expose_headers": ["ETag", "Location", "Retry-After", "Idempotent-Replayed"],
        "allow_credentials": False,
        "max_age": 600,
    }


@lru_cache(maxsize=8)
def _refusal(detail: str) -> tuple[bytes, bytes]:
    """The 431's status line and the rest of it after the server's own default headers."""
    body = json.dumps({"detail": detail}).encode()
    headers = [
        *SECURITY_HEADERS,
        NO_STORE,
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    rest = b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n" + body
    return STATUS_LINE[431], rest


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing (httptools re-raises it wrapped)."""


class EdgeHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, counting the bytes of each request's head.

    While a head is being received (from the end of the previous message to the blank line
    ending the head), each read is counted before the parser sees it, up to the blank line if
    it is in that read. A read in which one message ends and the next begins (pipelining) is
    not counted for the new message: its head is then measured again from the parsed request
    line and headers when they are complete. Either way a connection holds at most the bound
    plus one read (256 KiB at most).

    After the head, each read that does not end the message is counted less the body bytes
    the parser handed on (on_body): what is left is chunk framing and trailers, cut off past
    the bound plus FRAMING_ALLOWANCE (`_cut_off`).
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # Read here rather than passed in: uvicorn builds the protocol from its class alone.
        self._limit = get_settings().max_request_header_bytes
        self._head_detail = f"request headers larger than {self._limit} bytes"
        self._framing_limit = self._limit + FRAMING_ALLOWANCE
        self._in_head = True  # between messages or inside a head
        self._head_bytes = 0  # bytes of the current head in earlier reads
        self._tail = b""  # its last 3 bytes: the blank line may straddle two reads
        self._completed_here = False  # a message ended in the read being parsed
        self._head_uncounted = False  # the current head began in such a read
        self._refused = False
        self._refusal_pending = False  # refused while earlier answers were still due
        self._framing_bytes = 0  # the current message's non-body bytes after its head
        self._body_here = 0  # body bytes handed to on_body in the read being parsed
        self._linger: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # answered 431: drop whatever still comes until the connection closes
        self._unset_keepalive_if_required()
        if self._in_head and not self._head_fits(data):
            self._refuse()
            return
        # The current message's head ended in an earlier read: this one is body, chunk framing,
        # trailers, and perhaps (pipelined) the next message.
        after_head = not self._in_head
        self._completed_here = False
        self._body_here = 0
        # As uvicorn's own data_received, with our refusal told apart from a malformed request.
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            if self._refused:
                self._refuse()
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
        else:
            # Counted after parsing: only the parser knows which bytes were body. A message
            # that ended in this read is done with (the rest of the read is the next's head).
            if after_head and not self._completed_here:
                self._framing_bytes += len(data) - self._body_here
                if self._framing_bytes > self._framing_limit:
                    self._cut_off()

    def _head_fits(self, data: bytes) -> bool:
        seen = self._tail + data if self._tail else data
        end = seen.find(b"\r\n\r\n")
        if end >= 0:  # the head ends in this read: the rest is a body or the next request
            return self._head_bytes + end + 4 - len(self._tail) <= self._limit
        self._head_bytes += len(data)
        self._tail = seen[-3:]
        return self._head_bytes <= self._limit

    def on_message_begin(self) -> None:
        self._head_uncounted = self._completed_here
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        if self._head_uncounted and self._parsed_head_bytes() > self._limit:
            self._refused = True
            raise _HeadTooLarge
        self._in_head, self._head_bytes, self._tail = False, 0, b""
        self._framing_bytes = 0
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_here += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_head, self._head_bytes, self._tail = True, 0, b""
        self._completed_here = True
        super().on_message_complete()

    def _parsed_head_bytes(self) -> int:
        # The request line's method and version, and ": " and CRLF per header: a lower bound
        # of what was sent.
        return len(self.url) + 16 + sum(len(n) + len(v) + 4 for n, v in self.headers)

    def _cut_off(self) -> None:
        """The current message's chunk framing and trailers passed their bound."""
        self._refused = True  # whatever else comes is dropped
        logger.warning("http.trailers_too_large", limit=self._framing_limit)
        detail = f"request chunk framing and trailers larger than {self._framing_limit} bytes"
        cycle = self.cycle
        if self.pipeline and self.pipeline[0][0] is cycle:
            # Queued behind an earlier request (pipelining), its app not started: uvicorn
            # runs this in its place in its turn, after the earlier answers. The 431 is
            # written as for a head (half-close, linger), uvicorn writes nothing for it.

            async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
                cycle.disconnected = True
                self._answer_refusal(detail)

            self.pipeline[0] = (cycle, cast("ASGI3Application", refuse))
            return
        # The app is running (reading the body, or yet to, or answering): it is told at once
        # that the client is gone, as by connection_lost; it never waits for the rest of the
        # body, and whatever it still sends is dropped (nor a "100 Continue" written after
        # the half-close).
        cycle.disconnected = True
        cycle.waiting_for_100_continue = False
        cycle.message_event.set()
        if cycle.response_started:
            # It has answered or is answering: nothing else can be said on this connection.
            self._close_lingering()
        else:
            self._answer_refusal(detail)

    def _refuse(self) -> None:
        self._refused = True
        logger.warning("http.headers_too_large", limit=self._limit)
        if self._busy():
            # Earlier requests on this connection (pipelined) are still being answered: the
            # 431 follows their answers (on_response_complete), never interleaves with them.
            self._refusal_pending = True
            return
        self._answer_refusal(self._head_detail)

    def _busy(self) -> bool:
        return (self.cycle is not None and not self.cycle.response_complete) or bool(self.pipeline)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._refusal_pending and not self._busy() and not self.transport.is_closing():
            self._refusal_pending = False
            self._unset_keepalive_if_required()  # armed by uvicorn for the next request
            self._answer_refusal(self._head_detail)

    def _answer_refusal(self, detail: str) -> None:
        status, rest = _refusal(detail)
        defaults = b"".join(n + b": " + v + b"\r\n" for n, v in self.server_state.default_headers)
        self.transport.write(status + defaults + rest)
        self._close_lingering()

    def _close_lingering(self) -> None:
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._linger = self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        super().connection_lost(exc)
