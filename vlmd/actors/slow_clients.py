"""--client_timeout: how long a client that sends slowly, or stops sending, may hold the server.

uvicorn closes an idle keep-alive connection, but any byte received resets that timer, and nothing
bounds a connection that never finishes its headers or a body that stops halfway: each would hold
a socket for ever (enough of them and no client can connect), and a body still awaited holds the
drain of a stopping server. Here every request's headers must all have arrived within the timeout
of the connection opening or of the last response ending, else the connection is closed
(`HeaderDeadline`); a body must bring its next part within the timeout of the one before, else
the request is a 408 (`BodyReads`); and a server that starts draining answers the bodies it still
awaits with a 503 at once.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.requests import ClientDisconnect, Request
from uvicorn.protocols.http.h11_impl import H11Protocol

from vlmd.actors.inflight import ClientError, ClientGone, shutting_down


def header_deadline(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol, closing a connection whose next request's headers are not all
    in within `timeout_s` (uvicorn.Config(http=...))."""
    return type("HeaderDeadline", (HeaderDeadline,), {"timeout_s": timeout_s})


class HeaderDeadline(H11Protocol):
    timeout_s: float
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request: then it is the cycle
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self._deadline = self.loop.call_later(self.timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.cycle is None or self.cycle.response_complete:  # no request's headers since armed
            self.transport.close()


class BodyReads:
    """The request bodies being received, each with its deadline for the next part."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.draining = False
        self._deadlines: set[asyncio.Timeout] = set()

    async def read(self, request: Request, limit: int) -> bytearray:
        """The whole body. ClientError: 413 beyond `limit` bytes, 408 when a part is late, 503
        once draining; ClientGone when the client hangs up first."""
        if self.draining:
            raise shutting_down()
        loop = asyncio.get_running_loop()
        raw = bytearray()
        deadline = asyncio.timeout(self.timeout_s)
        self._deadlines.add(deadline)
        try:
            async with deadline:
                async for chunk in request.stream():
                    raw += chunk
                    if len(raw) > limit:
                        raise ClientError(413, f"request body exceeds the limit of {limit} bytes")
                    deadline.reschedule(loop.time() + self.timeout_s)
        except TimeoutError:
            if self.draining:
                raise shutting_down() from None
            raise ClientError(
                408,
                f"the request body stopped arriving: no part of it came within "
                f"{self.timeout_s:g} s (--client_timeout)",
                headers={"Connection": "close"},
            ) from None
        except ClientDisconnect:
            raise ClientGone() from None
        finally:
            self._deadlines.discard(deadline)
        return raw

    def drain(self) -> None:
        """Bodies awaited from now on, and those awaited now, are refused at once."""
        self.draining = True
        now = asyncio.get_running_loop().time()
        for deadline in self._deadlines:
            with contextlib.suppress(RuntimeError):  # one already past its deadline
                deadline.reschedule(now)
