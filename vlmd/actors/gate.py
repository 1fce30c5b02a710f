"""What every HTTP request passes before it reaches a route: the API key and the drain.

With --api_key, every route but /health and /metrics needs `Authorization: Bearer KEY` (as vLLM's
--api-key; probes and scrapers carry no key). Once the server is draining (it was told to stop),
new requests get a 503 while those already let in run to their end; the gate counts them, streams
included, so the drain knows when none is left. Refusals take the error shape of the API asked:
OpenAI's on /v1 routes, LightLLM's `{"error": ...}` elsewhere.
"""

from __future__ import annotations

import asyncio
import hmac

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from vlmd.actors import lightllm_api, openai_api
from vlmd.actors.inflight import ClientError, shutting_down

OPEN_PATHS = frozenset({"/health", "/metrics"})  # exact paths: any other spelling needs the key


class Gate:
    """ASGI middleware in front of the whole app (see the module docstring)."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self._api_key = None if api_key is None else api_key.encode()
        self.draining = False
        self.num_active = 0  # requests let in whose response has not ended yet
        self._idle = asyncio.Event()
        self._idle.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await render_error(scope["path"], refusal)(scope, receive, send)
            return
        self.num_active += 1
        self._idle.clear()
        try:
            await self.app(scope, receive, send)
        finally:
            self.num_active -= 1
            if self.num_active == 0:
                self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no request let in is running; False if some still are after `timeout_s`."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def _refusal(self, scope: Scope) -> ClientError | None:
        if self._api_key is not None and not self._authorized(scope):
            return ClientError(
                401,
                "missing or wrong API key: send the header `Authorization: Bearer <key>`",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if self.draining:
            return shutting_down()
        return None

    def _authorized(self, scope: Scope) -> bool:
        given = [value for name, value in scope["headers"] if name == b"authorization"]
        if len(given) != 1:
            return False
        scheme, _, key = given[0].partition(b" ")
        # Constant time: how much of the key matched must not show in the time to answer.
        return scheme.lower() == b"bearer" and hmac.compare_digest(key, self._api_key)


def render_error(path: str, error: ClientError) -> Response:
    """`error` in the shape of the API `path` belongs to."""
    if path.startswith("/v1/"):
        return openai_api.error_response(error)
    return lightllm_api.error_response(error.status, str(error), error.headers)
