"""A fixed pool of KV-cache pages handed out to requests."""

from __future__ import annotations


class PageAllocator:
    """Page ids [0, num_pages), each free or owned by one request.

    Memory is O(pages ever handed out), not O(num_pages): a GPU pool can hold tens of millions of
    pages, so ids never allocated are implied by a high-water mark instead of listed.
    """

    def __init__(self, num_pages: int) -> None:
        assert num_pages > 0
        self.num_pages = num_pages
        self._returned: list[int] = []  # freed pages, reused first (most recently freed first)
        self._next_fresh = 0  # ids >= this have never been handed out
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._returned) + self.num_pages - self._next_fresh

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, count: int) -> list[int]:
        if count > self.num_free:
            raise MemoryError(f"asked for {count} KV pages, {self.num_free} free")
        reused = min(count, len(self._returned))
        pages = [self._returned.pop() for _ in range(reused)]
        fresh = count - reused
        pages += range(self._next_fresh, self._next_fresh + fresh)
        self._next_fresh += fresh
        self._used.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        for page in pages:
            assert page in self._used, f"page {page} freed twice or never allocated"
            self._used.remove(page)
            self._returned.append(page)

    def check_integrity(self) -> None:
        returned = set(self._returned)
        assert len(returned) == len(self._returned), "duplicate page in free list"
        assert not returned & self._used, "page both free and used"
        assert all(page < self._next_fresh for page in returned | self._used), (
            "page beyond the high-water mark"
        )
        assert len(returned) + len(self._used) == self._next_fresh, "pages lost"


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)
