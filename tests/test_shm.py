"""Shared-memory segments: pages allocated up front (a full tmpfs is an OSError, never a SIGBUS),
image bytes held by reference count, and a server whose /dev/shm fills up that answers 503 and
goes on serving.

A full tmpfs is made for real, never by filling the machine's /dev/shm (others use it): a small
tmpfs mounted on a test folder, or, for a server, over /dev/shm in a mount namespace of its own.
Both need root (CAP_SYS_ADMIN); without it these tests skip.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import os
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from functools import cache

import pytest
import requests

from tests.conftest import make_image, start_server
from tests.test_http import GOOD_PROMPT
from vlmd import shm

# A command in a mount namespace of its own, whose /dev/shm is a tmpfs of 8 MiB (gone with it).
PRIVATE_SHM = [
    "unshare",
    "--mount",
    "sh",
    "-c",
    'mount -t tmpfs -o size=8m tmpfs /dev/shm && exec "$@"',
    "sh",
]


@cache
def can_mount_tmpfs() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(PRIVATE_SHM + ["true"], capture_output=True)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not can_mount_tmpfs(), reason="needs root to mount a tmpfs")


@contextmanager
def small_tmpfs(path, size: str):
    """A tmpfs of `size` on `path`, as shm.SHM_DIR."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    saved, shm.SHM_DIR = shm.SHM_DIR, str(path)
    try:
        yield path
    finally:
        shm.SHM_DIR = saved
        subprocess.run(["umount", "--lazy", str(path)], check=True)  # a failed test may still map it


def test_a_segment_has_its_pages_when_it_is_created():
    """A sparse segment would get its pages on first write, where a full tmpfs is a SIGBUS."""
    segment = shm.SharedSegment.create(f"vlmd-{os.getpid()}-test-pages", 3 * 2**20 + 5)
    try:
        assert os.stat(f"/dev/shm/{segment.name}").st_blocks * 512 >= 3 * 2**20 + 5
    finally:
        segment.close()
        segment.unlink()


@needs_mount
def test_a_segment_beyond_the_free_space_is_an_oserror_and_leaves_nothing(tmp_path):
    with small_tmpfs(tmp_path / "shm", "1m") as root:
        kept = shm.SharedSegment.create("kept", 512 * 1024)
        try:
            for num_bytes in (768 * 1024, 4 * 2**20):  # beyond what is free, beyond the whole tmpfs
                with pytest.raises(OSError) as raised:
                    shm.SharedSegment.create("refused", num_bytes)
                assert raised.value.errno == errno.ENOSPC
                assert sorted(os.listdir(root)) == ["kept"]
            assert shm.free_bytes() >= 448 * 1024  # the refused pages were given back
        finally:
            kept.close()


def test_shared_bytes_are_unlinked_by_the_last_holder():
    image_bytes = shm.SharedBytes(f"vlmd-{os.getpid()}-test-")
    first = image_bytes.acquire("key", b"pixels")
    second = image_bytes.acquire("key", b"pixels")
    assert first == second and shm.read_segment(first, 6) == b"pixels"
    image_bytes.release(first)
    assert shm.read_segment(second, 6) == b"pixels"  # the other holder still reads it
    image_bytes.release(second)
    assert not os.path.exists(f"/dev/shm/{first}") and len(image_bytes) == 0


def _slow_thread_write(started: threading.Event, go_on: threading.Event):
    """A `run` for SharedBytes.acquire_async whose write, on a thread, waits for `go_on`."""

    async def run(write, name, data):
        def held_back():
            started.set()
            go_on.wait(10)
            write(name, data)

        await asyncio.to_thread(held_back)

    return run


def test_shared_bytes_written_off_the_loop_are_shared_and_leak_nothing():
    image_bytes = shm.SharedBytes(f"vlmd-{os.getpid()}-test-async-")
    data = os.urandom(3 << 20)

    async def scenario() -> None:
        started, go_on = threading.Event(), threading.Event()
        run = _slow_thread_write(started, go_on)
        first = asyncio.ensure_future(image_bytes.acquire_async("key", data, run))
        second = asyncio.ensure_future(image_bytes.acquire_async("key", data, run))
        cancelled = asyncio.ensure_future(image_bytes.acquire_async("key", data, run))
        await asyncio.to_thread(started.wait, 10)
        ticks = 0
        while ticks < 5:  # the loop goes on while the thread writes
            await asyncio.sleep(0.001)
            ticks += 1
        cancelled.cancel()
        go_on.set()
        name = await first
        assert await second == name and cancelled.cancelled()
        assert shm.read_segment(name, len(data)) == data  # one write, both holders read it
        image_bytes.release(name)
        assert os.path.exists(f"/dev/shm/{name}")
        image_bytes.release(name)
        assert not os.path.exists(f"/dev/shm/{name}") and len(image_bytes) == 0

        # Every caller gone before the write ends: the segment it then makes is unlinked.
        started.clear()
        go_on.clear()
        alone = asyncio.ensure_future(image_bytes.acquire_async("other", data, run))
        await asyncio.to_thread(started.wait, 10)
        alone.cancel()
        await asyncio.sleep(0)
        go_on.set()
        while image_bytes._writing:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert [n for n in os.listdir("/dev/shm") if n.startswith(image_bytes.prefix)] == []
    assert len(image_bytes) == 0


def test_a_failed_write_off_the_loop_fails_every_caller_and_holds_nothing(monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shm.SharedSegment, "create", full)
    image_bytes = shm.SharedBytes(f"vlmd-{os.getpid()}-test-full-")

    async def scenario() -> list:
        return await asyncio.gather(
            *(image_bytes.acquire_async("key", b"x" * 100, asyncio.to_thread) for _ in range(2)),
            return_exceptions=True,
        )

    results = asyncio.run(scenario())
    assert [getattr(r, "errno", None) for r in results] == [errno.ENOSPC] * 2
    assert len(image_bytes) == 0 and not image_bytes._writing


NO_ROOM = """
import errno, os, sys
from vlmd import shm
shm.SHM_DIR = sys.argv[1]
image_bytes = shm.SharedBytes("test-")
try:
    image_bytes.acquire("big", bytes(2 * 2**20))
except OSError as exc:
    assert exc.errno == errno.ENOSPC, exc
assert len(image_bytes) == 0 and os.listdir(shm.SHM_DIR) == []
"""


@needs_mount
def test_shared_bytes_that_find_no_room_hold_nothing(tmp_path):
    """In a child process: if the bytes were written to pages never allocated, it dies of SIGBUS."""
    with small_tmpfs(tmp_path / "shm", "1m") as root:
        child = subprocess.run([sys.executable, "-c", NO_ROOM, str(root)], capture_output=True, text=True)
    assert child.returncode == 0, f"exit {child.returncode}: {child.stderr}"


def image_body(image: bytes) -> dict:
    return {
        "inputs": GOOD_PROMPT,
        "parameters": {"max_new_tokens": 2},
        "multimodal_params": {"images": [{"type": "base64", "data": base64.b64encode(image).decode()}]},
    }


@needs_mount
def test_a_full_dev_shm_is_a_503_and_the_server_goes_on(model_dir, tmp_path):
    """/dev/shm fills up while the server runs: the request whose image finds no room gets a 503
    without an internal path, and once there is room again images are served."""
    server = start_server(
        model_dir, tmp_path, "--enable_multimodal", "--embed_store_mb", "4", prefix=PRIVATE_SHM
    )
    private_shm = f"/proc/{server.process.pid}/root/dev/shm"
    image = make_image(460, 460, seed=90)
    try:
        stats = os.statvfs(private_shm)
        fd = os.open(f"{private_shm}/filler", os.O_CREAT | os.O_WRONLY, 0o600)
        os.posix_fallocate(fd, 0, stats.f_bavail * stats.f_frsize - len(image) // 2)
        os.close(fd)
        refused = requests.post(server.url + "/generate", json=image_body(image), timeout=60)
        assert refused.status_code == 503, refused.text
        assert "shared memory" in refused.json()["error"] and "/dev/shm" not in refused.text
        assert refused.headers["Retry-After"] == "1"
        os.unlink(f"{private_shm}/filler")
        served = requests.post(server.url + "/generate", json=image_body(image), timeout=60)
        assert served.status_code == 200, served.text
        assert os.listdir(private_shm) == [f"vlmd-{server.server_id}-embeds"]
    finally:
        assert server.stop() == 0, server.log()
    assert server.actor_pids() == []
