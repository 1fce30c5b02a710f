"""Limits that protect the server, checked by the http actor before a request goes further.

--max_body_bytes, --max_image_bytes and --max_image_pixels are checked where the bytes are read
(`HttpActor.read_body`, `ImageChecker`, `ImageFetcher`); the request-level limits are here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from vlmd.actors.inflight import ClientError

RETRY_AFTER_S = 1  # what a 503 for a full queue tells the client to wait


class LimitExceeded(ClientError):
    """The request is refused by one of the server's limits; the message names the flag. Every
    API answers it as any other client error (with its headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, headers=headers)


class QueueGate:
    """Bounds the requests accepted and not yet given their first token (--max_queued_requests).

    An API request takes its places (one per completion it asks for) before its images are fetched
    and preprocessed (`reserve`); each completion, handed to the scheduler, takes one of them over
    (`enter`) and leaves on its first token, its failure or its abort, whichever comes first;
    leaving twice is harmless. The http actor's event loop is the only user, so a check and the
    entry it allows are one atomic step and the count is exact.
    """

    def __init__(self, limit: int) -> None:
        assert limit > 0
        self.limit = limit
        self._request_ids: set[str] = set()
        self._reserved = 0  # places of requests not handed to the scheduler yet

    def __len__(self) -> int:
        return len(self._request_ids) + self._reserved

    def check_room(self, num_requests: int) -> None:
        if num_requests > self.limit:  # never: a retry would not help
            raise LimitExceeded(
                400,
                f"the request asks for {num_requests} completions at once; --max_queued_requests "
                f"allows {self.limit} waiting for their first token",
            )
        if len(self) + num_requests > self.limit:
            raise LimitExceeded(
                503,
                f"the server has {len(self)} requests waiting for their first token, "
                f"--max_queued_requests allows {self.limit}; retry later",
                {"Retry-After": str(RETRY_AFTER_S)},
            )

    @contextlib.contextmanager
    def reserve(self, num_requests: int) -> Iterator[Places]:
        """Places for `num_requests` completions, held until they enter or the block ends."""
        self.check_room(num_requests)
        places = Places(num_requests)
        self._reserved += num_requests
        try:
            yield places
        finally:
            self._reserved -= places.left

    def enter(self, request_id: str, places: Places) -> None:
        """The request takes one of the places reserved for it."""
        assert places.left > 0, "a request enters in a place reserved for it"
        places.left -= 1
        self._reserved -= 1
        self._request_ids.add(request_id)

    def leave(self, request_id: str) -> None:
        self._request_ids.discard(request_id)


@dataclass
class Places:
    """Places reserved in the QueueGate and not yet taken by a request."""

    left: int


def check_image_count(num_images: int, limit: int) -> None:
    if num_images > limit:
        raise LimitExceeded(
            400, f"the request has {num_images} images; --max_images_per_request allows at most {limit}"
        )
