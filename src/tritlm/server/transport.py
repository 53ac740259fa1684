"""The uvicorn settings `tritlm serve` runs with: limits on connections, below the HTTP API.

uvicorn times out only idle kept-alive connections: a client that connects and sends nothing, or
its request a byte now and then, holds its connection (and a file descriptor) for ever. Here each
request must arrive whole, head and body, within `read_timeout` seconds of the connection opening
or of the previous response ending; past that the connection is closed, unanswered.
"""

from __future__ import annotations

import asyncio
import functools

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_READ_TIMEOUT = 60.0
KEEP_ALIVE_TIMEOUT = 5  # seconds an idle kept-alive connection stays open (uvicorn's default)
MAX_HEAD_BYTES = 16 * 1024  # a request line and headers beyond this are refused (400)
SHUTDOWN_GRACE = 10  # seconds open requests get after SIGTERM before they are cancelled


def uvicorn_options(read_timeout: float = DEFAULT_READ_TIMEOUT) -> dict:
    """Keyword arguments for `uvicorn.run` / `uvicorn.Config`."""
    if not read_timeout > 0:
        raise ValueError(f"read_timeout must be positive, got {read_timeout}")
    return {"http": functools.partial(_DeadlineProtocol, read_timeout=read_timeout),
            "timeout_keep_alive": KEEP_ALIVE_TIMEOUT, "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
            "timeout_graceful_shutdown": SHUTDOWN_GRACE}


class _DeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, with a deadline for each request to arrive whole."""

    def __init__(self, *args, read_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):  # it is in (or the connection is over)
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self._arm()  # the next request on a kept-alive connection

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self.deadline = self.loop.call_later(self.read_timeout, self._expired)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _expired(self) -> None:
        self.deadline = None
        if not self.transport.is_closing():
            self.transport.close()
