"""Named shared-memory segments (POSIX shm under /dev/shm), without multiprocessing's tracker.

Every segment of one server is named `vlmd-<supervisor pid>-<what>`, so the supervisor can
unlink all of them at shutdown, whatever state the actors died in.

A segment's pages are allocated when it is created (posix_fallocate), never on first write: /dev/shm
is a tmpfs, and a write through a mapping to a page tmpfs has no room for is a SIGBUS that kills
the process, where an allocation that fails is an OSError its caller can answer.
"""

from __future__ import annotations

import asyncio
import mmap
import os
from collections.abc import Awaitable, Callable

import numpy as np

SHM_DIR = "/dev/shm"


def segment_prefix(server_id: int) -> str:
    return f"vlmd-{server_id}-"


def free_bytes() -> int:
    """Bytes /dev/shm can still allocate."""
    stats = os.statvfs(SHM_DIR)
    return stats.f_bavail * stats.f_frsize


class SharedSegment:
    """A named shared-memory segment mapped into this process."""

    def __init__(self, name: str, num_bytes: int, create: bool) -> None:
        assert "/" not in name, "segment names are flat"
        self.name = name
        path = os.path.join(SHM_DIR, name)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                _allocate(fd, path, max(num_bytes, 1))
            else:
                num_bytes = os.fstat(fd).st_size
            self.num_bytes = num_bytes
            self.buf = mmap.mmap(fd, max(num_bytes, 1))
        finally:
            os.close(fd)

    @classmethod
    def create(cls, name: str, num_bytes: int) -> SharedSegment:
        """A new segment with all its pages allocated; OSError (ENOSPC) when /dev/shm is full."""
        return cls(name, num_bytes, create=True)

    @classmethod
    def attach(cls, name: str) -> SharedSegment:
        return cls(name, 0, create=False)

    def close(self) -> None:
        try:
            self.buf.close()
        except BufferError:
            pass  # a tensor view still exports the buffer; the mapping goes with the process

    def unlink(self) -> None:
        unlink_segment(self.name)


def _allocate(fd: int, path: str, num_bytes: int) -> None:
    """Size the new file at `path` to `num_bytes` with every page allocated, or remove it and raise."""
    try:
        os.posix_fallocate(fd, 0, num_bytes)
    except BaseException:
        os.unlink(path)
        raise


def unlink_segment(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


def unlink_all(prefix: str) -> list[str]:
    """Unlink every segment whose name starts with `prefix`; returns the names removed."""
    removed = []
    for name in os.listdir(SHM_DIR):
        if name.startswith(prefix):
            unlink_segment(name)
            removed.append(name)
    return removed


def read_segment(name: str, num_bytes: int) -> bytes:
    """The first `num_bytes` of a segment (the writer keeps it, and unlinks it)."""
    segment = SharedSegment.attach(name)
    try:
        return bytes(segment.buf[:num_bytes])
    finally:
        segment.close()


def write_array(name: str, array: np.ndarray) -> None:
    """A new segment `name` holding `array`'s bytes; OSError (ENOSPC) when /dev/shm is full,
    creating nothing."""
    segment = SharedSegment.create(name, array.nbytes)
    try:
        view = np.ndarray(array.shape, array.dtype, buffer=segment.buf)
        view[...] = array  # a strided array (a one-tile image's) lands in order
        del view  # the mapping closes only once no array exports it
    finally:
        segment.close()


def read_array(name: str, out: np.ndarray) -> None:
    """Fill `out` from segment `name`, written by `write_array` with out's shape and dtype; OSError
    if the segment is gone."""
    segment = SharedSegment.attach(name)
    try:
        assert segment.num_bytes == out.nbytes, "the segment does not hold an array of that shape"
        view = np.ndarray(out.shape, out.dtype, buffer=segment.buf)
        out[...] = view
        del view
    finally:
        segment.close()


class SharedBytes:
    """Byte segments held by reference count: one segment per key, however many holders.

    The http actor writes each distinct image once, and every request that needs it holds a
    reference until the image can no longer be read for it. A request whose image is already being
    encoded for another request waits on that encode, which reads the segment both share: so the
    bytes must outlive whichever request sent them first, and only the last release unlinks them.
    One event loop uses it, so the counts are exact.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._num_holders: dict[str, int] = {}  # segment name -> references
        self._writing: dict[str, asyncio.Future] = {}  # segment name -> its write, until it ends

    def __len__(self) -> int:
        return len(self._num_holders)

    def acquire(self, key: str, data: bytes) -> str:
        """The name of `key`'s segment, written from `data` unless someone holds it already (the
        same key must mean the same bytes). OSError when /dev/shm has no room: nothing is held."""
        name = f"{self.prefix}img-{key}"
        assert name not in self._writing, "acquire_async is writing the key"
        if name not in self._num_holders:
            write_bytes(name, data)
        return self.hold(name)

    async def acquire_async(self, key: str, data: bytes, run: Callable[..., Awaitable]) -> str:
        """`acquire`, with the new segment written by `await run(write_bytes, name, data)` (a
        thread's: its allocation and copy hold no GIL) while the loop goes on. An acquire of the
        key meanwhile waits for that write and fails as it does; a caller cancelled meanwhile
        holds nothing, and the segment of a write nobody holds by its end is unlinked then."""
        name = f"{self.prefix}img-{key}"
        writing = self._writing.get(name)
        if writing is None and name not in self._num_holders:
            writing = asyncio.ensure_future(run(write_bytes, name, data))
            self._writing[name] = writing
            writing.add_done_callback(lambda _: self._writing.pop(name, None))
        self.hold(name)  # held from now: a second caller shares the write
        if writing is not None:
            try:
                await asyncio.shield(writing)
            except BaseException:
                self.release(name)
                raise
        return name

    def hold(self, name: str) -> str:
        """Another reference to a segment held already (or being written by `acquire_async`)."""
        self._num_holders[name] = self._num_holders.get(name, 0) + 1
        return name

    def release(self, name: str) -> None:
        if _last_release(self._num_holders, name):
            writing = self._writing.get(name)
            if writing is None:
                unlink_segment(name)
            else:  # the write may create it yet: unlinked once it has ended (and unless held again)
                writing.add_done_callback(lambda _: name in self._num_holders or unlink_segment(name))


def write_bytes(name: str, data: bytes) -> None:
    """A new segment `name` holding `data`; OSError (ENOSPC) when /dev/shm is full, creating
    nothing. Its pages are allocated and filled without the GIL (posix_fallocate, numpy's copy),
    so that a thread can write a large image while the event loop runs."""
    segment = SharedSegment.create(name, len(data))
    try:
        view = np.frombuffer(segment.buf, np.uint8, len(data))
        view[:] = np.frombuffer(data, np.uint8)
        del view  # the mapping closes only once no array exports it
    finally:
        segment.close()


class SharedPixels:
    """Segments of an image's tiles (uint8, before normalisation), by embed key, held by reference count as
    SharedBytes holds bytes: every request of the key shares the one segment, the last release
    unlinks it. A preprocess worker writes the segment; `adopt` makes it the key's (or unlinks it,
    when another request's tiles of the key are held already). One event loop uses it."""

    def __init__(self) -> None:
        self._by_key: dict[str, str] = {}  # embed key -> segment name
        self._keys: dict[str, str] = {}  # segment name -> embed key
        self._num_holders: dict[str, int] = {}  # segment name -> references

    def __len__(self) -> int:
        return len(self._num_holders)

    def adopt(self, key: str, name: str) -> str:
        """Hold the fresh segment `name` as `key`'s tiles; the name to read them from."""
        held = self._by_key.get(key)
        if held is not None:
            unlink_segment(name)  # the same key means the same tiles
            return self.hold(held)
        self._by_key[key], self._keys[name] = name, key
        return self.hold(name)

    def acquire(self, key: str) -> str:
        """Another hold of `key`'s tiles if some request holds them; "" if none does."""
        name = self._by_key.get(key)
        return "" if name is None else self.hold(name)

    def hold(self, name: str) -> str:
        assert name in self._keys, "only adopted segments are held"
        self._num_holders[name] = self._num_holders.get(name, 0) + 1
        return name

    def release(self, name: str) -> None:
        if _last_release(self._num_holders, name):
            del self._by_key[self._keys.pop(name)]
            unlink_segment(name)


def _last_release(num_holders: dict[str, int], name: str) -> bool:
    """One holder of `name` lets go; True when it was the last (its count is gone then)."""
    count = num_holders.pop(name) - 1
    if count:
        num_holders[name] = count
    return count == 0
