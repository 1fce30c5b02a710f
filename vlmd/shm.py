"""Named shared-memory segments (POSIX shm under /dev/shm), without multiprocessing's tracker.

Every segment of one server is named `vlmd-<supervisor pid>-<what>`, so the supervisor can
unlink all of them at shutdown, whatever state the actors died in.
"""

from __future__ import annotations

import mmap
import os
import uuid

SHM_DIR = "/dev/shm"


def segment_prefix(server_id: int) -> str:
    return f"vlmd-{server_id}-"


class SharedSegment:
    """A named shared-memory segment mapped into this process."""

    def __init__(self, name: str, num_bytes: int, create: bool) -> None:
        assert "/" not in name, "segment names are flat"
        self.name = name
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(os.path.join(SHM_DIR, name), flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, max(num_bytes, 1))
            else:
                num_bytes = os.fstat(fd).st_size
            self.num_bytes = num_bytes
            self.buf = mmap.mmap(fd, max(num_bytes, 1))
        finally:
            os.close(fd)

    @classmethod
    def create(cls, name: str, num_bytes: int) -> SharedSegment:
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


def unlink_segment(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


def write_bytes_segment(prefix: str, data: bytes) -> str:
    """Put `data` in a fresh segment and return its name; the reader unlinks it."""
    name = f"{prefix}img-{uuid.uuid4().hex}"
    segment = SharedSegment.create(name, len(data))
    segment.buf[: len(data)] = data
    segment.close()
    return name


def read_bytes_segment(name: str, num_bytes: int) -> bytes:
    """Read and unlink a segment written by `write_bytes_segment`."""
    segment = SharedSegment.attach(name)
    try:
        return bytes(segment.buf[:num_bytes])
    finally:
        segment.close()
        segment.unlink()


def unlink_all(prefix: str) -> list[str]:
    """Unlink every segment whose name starts with `prefix`; returns the names removed."""
    removed = []
    for name in os.listdir(SHM_DIR):
        if name.startswith(prefix):
            unlink_segment(name)
            removed.append(name)
    return removed
