"""Limits that protect the server, checked by the http actor before a request goes further.

--max_body_bytes, --max_image_bytes and --max_image_pixels are checked where the bytes are read
(`HttpActor.read_body`, `ImageChecker`, `ImageFetcher`); the request-level limits are here.
"""

from __future__ import annotations

from vlmd.actors.inflight import ClientError

RETRY_AFTER_S = 1  # what a 503 for a full queue tells the client to wait


class LimitExceeded(ClientError):
    """The request is refused by one of the server's limits; the message names the flag. Every
    API answers it as any other client error (with its headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, headers=headers)


class QueueGate:
    """Bounds the requests accepted and not yet given their first token (--max_queued_requests).

    A request enters when it is handed to the scheduler, and leaves on its first token, its
    failure or its abort, whichever comes first; leaving twice is harmless. The
    http actor's event loop is the only user, so the check and the entry are one atomic step and
    the count is exact.
    """

    def __init__(self, limit: int) -> None:
        assert limit > 0
        self.limit = limit
        self._request_ids: set[str] = set()

    def __len__(self) -> int:
        return len(self._request_ids)

    def check_room(self, num_requests: int) -> None:
        if len(self._request_ids) + num_requests > self.limit:
            raise LimitExceeded(
                503,
                f"the server already has {self.limit} requests waiting for their first token "
                f"(--max_queued_requests); retry later",
                {"Retry-After": str(RETRY_AFTER_S)},
            )

    def enter(self, request_id: str) -> None:
        self.check_room(1)
        self._request_ids.add(request_id)

    def leave(self, request_id: str) -> None:
        self._request_ids.discard(request_id)


def check_image_count(num_images: int, limit: int) -> None:
    if num_images > limit:
        raise LimitExceeded(
            400, f"the request has {num_images} images; --max_images_per_request allows at most {limit}"
        )
