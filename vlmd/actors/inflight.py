"""The http actor's view of a request in flight, and the errors that end one, shared by every API."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from vlmd.messages import TopLogprobs


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class ClientError(Exception):
    """A request the server will not serve: `status` is the HTTP status, `param` the request
    parameter at fault when there is one, `code` a machine-readable reason for OpenAI clients."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code
        self.headers = headers or {}  # e.g. Retry-After on a 503


def refuse_asked(asked: dict[str, bool]) -> None:
    """A 400 naming the first parameter asked for (True) that the server does not do: an answer
    that quietly left it out would look like it was done."""
    for name, given in asked.items():
        if given:
            raise ClientError(400, f"parameter `{name}` is not supported by this server", name)


def shutting_down() -> ClientError:
    """A request the draining server no longer takes in; Connection: close, so that a keep-alive
    client reconnects (to another replica)."""
    return ClientError(503, "the server is shutting down", headers={"Connection": "close"})


@dataclass
class Tracked:
    """A request in flight: tokens as they arrive, and a future for the end."""

    done: asyncio.Future
    arrival: float  # time.perf_counter() when the request was parsed: latencies count from here
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # of those, found in the prefix cache (told with the first token)
    last_token_at: float | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)  # when the request asked for them
    # Image byte segments it holds: until its first token (its images are encoded by then) or its end.
    segments: list[str] = field(default_factory=list)
    pixel_segments: list[str] = field(default_factory=list)  # its images' tiles, held as long
    # TokenOut / ClientError, for the consumers that follow tokens; several requests (the choices
    # of one OpenAI request) may share one queue.
    updates: asyncio.Queue = field(default_factory=asyncio.Queue)
