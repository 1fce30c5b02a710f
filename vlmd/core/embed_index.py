"""The EmbedStore index: which image's embedding rows live where, and which may be evicted.

The store is one arena of `num_rows` embedding rows; each image owns one contiguous run.
Entries are pinned by the requests that use them (waiting or running) and are never evicted
while pinned; unpinned entries are evicted least-recently-used first, when the number of
images exceeds `capacity_images` or when a new run does not fit in the arena.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class Entry:
    md5: str
    row_offset: int
    num_rows: int
    pinned_by: set[str] = field(default_factory=set)


class RowArena:
    """First-fit allocator of contiguous row runs, with coalescing of free neighbours."""

    def __init__(self, num_rows: int) -> None:
        self.num_rows = num_rows
        self._free: list[tuple[int, int]] = [(0, num_rows)]  # sorted (offset, length)

    def allocate(self, num_rows: int) -> int | None:
        for i, (offset, length) in enumerate(self._free):
            if length >= num_rows:
                if length == num_rows:
                    del self._free[i]
                else:
                    self._free[i] = (offset + num_rows, length - num_rows)
                return offset
        return None

    def free(self, offset: int, num_rows: int) -> None:
        i = bisect.bisect(self._free, (offset, num_rows))
        self._free.insert(i, (offset, num_rows))
        # Merge with the right neighbour, then the left one.
        if i + 1 < len(self._free) and offset + num_rows == self._free[i + 1][0]:
            self._free[i] = (offset, num_rows + self._free.pop(i + 1)[1])
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            prev_offset, prev_len = self._free[i - 1]
            self._free[i - 1] = (prev_offset, prev_len + self._free.pop(i)[1])

    @property
    def num_free_rows(self) -> int:
        return sum(length for _, length in self._free)

    def check_integrity(self) -> None:
        end = -1
        for offset, length in self._free:
            assert length > 0 and offset > end, "free runs overlap or touch without merging"
            end = offset + length
        assert end <= self.num_rows


class EmbedIndex:
    """MD5 -> run of rows, LRU over unpinned entries."""

    def __init__(self, capacity_images: int, num_rows: int) -> None:
        assert capacity_images > 0 and num_rows > 0
        self.capacity_images = capacity_images
        self.arena = RowArena(num_rows)
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self.num_evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, md5: str) -> bool:
        return md5 in self._entries

    @property
    def num_pinned(self) -> int:
        """Entries some request (or an encode in flight) pins: none once the server is idle."""
        return sum(1 for entry in self._entries.values() if entry.pinned_by)

    def lookup(self, md5: str, pin_for: str) -> Entry | None:
        """A hit pins the entry for `pin_for` and marks it most recently used."""
        entry = self._entries.get(md5)
        if entry is not None:
            self._entries.move_to_end(md5)
            entry.pinned_by.add(pin_for)
        return entry

    def insert(self, md5: str, num_rows: int, pin_for: str) -> Entry | None:
        """Reserve a run for a new image, evicting unpinned LRU entries as needed.

        Returns None when the pinned entries leave no room (the caller must wait or refuse).
        """
        assert md5 not in self._entries
        while len(self._entries) >= self.capacity_images:
            if not self._evict_one():
                return None
        offset = self.arena.allocate(num_rows)
        while offset is None:
            if not self._evict_one():
                return None
            offset = self.arena.allocate(num_rows)
        entry = Entry(md5, offset, num_rows, {pin_for})
        self._entries[md5] = entry
        return entry

    def remove(self, md5: str) -> None:
        """Drop an entry whose rows never got written (the encode failed)."""
        entry = self._entries.pop(md5)
        self.arena.free(entry.row_offset, entry.num_rows)

    def unpin(self, request_id: str, md5s: list[str]) -> None:
        for md5 in md5s:
            entry = self._entries.get(md5)
            if entry is not None:
                entry.pinned_by.discard(request_id)

    def _evict_one(self) -> bool:
        for md5, entry in self._entries.items():
            if not entry.pinned_by:
                del self._entries[md5]
                self.arena.free(entry.row_offset, entry.num_rows)
                self.num_evictions += 1
                return True
        return False

    def check_integrity(self) -> None:
        self.arena.check_integrity()
        used = sum(e.num_rows for e in self._entries.values())
        assert used + self.arena.num_free_rows == self.arena.num_rows, "rows lost or double-counted"
        runs = sorted((e.row_offset, e.num_rows) for e in self._entries.values())
        for (a_off, a_len), (b_off, _) in zip(runs, runs[1:], strict=False):
            assert a_off + a_len <= b_off, "entries overlap"
        assert len(self._entries) <= self.capacity_images
