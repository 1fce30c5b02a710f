"""A fixed pool of KV-cache pages handed out to requests."""

from __future__ import annotations


class PageAllocator:
    """Free list over page ids [0, num_pages). A page is either free or owned by one request."""

    def __init__(self, num_pages: int) -> None:
        assert num_pages > 0
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise MemoryError(f"asked for {count} KV pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(count)]
        self._used.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        for page in pages:
            assert page in self._used, f"page {page} freed twice or never allocated"
            self._used.remove(page)
            self._free.append(page)

    def check_integrity(self) -> None:
        free = set(self._free)
        assert len(free) == len(self._free), "duplicate page in free list"
        assert not free & self._used, "page both free and used"
        assert len(free) + len(self._used) == self.num_pages, "pages lost"


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)
