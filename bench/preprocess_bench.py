"""Image preprocessing off the ViT's path (issue 16): what the ViT leader's thread does per image
before the forward, and how many images per second the preprocess pool supplies.

- leader: the old path decoded, tiled and normalised each image on the ViT's thread
  (`decode_image` + `preprocess`); the new one copies the uint8 tiles a preprocess worker wrote
  into shared memory (`ViTRank.load_pixels`' read; it normalises them on the ViT's device after).
- pool: images per second through `PreprocessPool` with 0 (a thread of the caller), 1 and 2
  worker processes, `--concurrency` images in flight, PNGs of one size.

    python bench/preprocess_bench.py --width 1344 --height 896 --images 32
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from vlmd import ipc, shm
from vlmd.actors.preprocess import PreprocessPool, preprocess_job, worker_socket
from vlmd.image import TilingConfig, decode_image, preprocess
from vlmd.messages import Hello, PreprocessImage

TILING = TilingConfig()


def png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def leader_ms(data: bytes, repeats: int) -> tuple[float, float]:
    """(old, new) ms per image on the ViT leader's thread, best of `repeats`."""
    old, new = [], []
    name = f"{shm.segment_prefix(os.getpid())}bench-tiles"
    answer = preprocess_job(PreprocessImage(0, data, name, 10**9), TILING)
    size = TILING.tile_size
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            preprocess(decode_image(data), TILING)
            old.append(time.perf_counter() - start)
            start = time.perf_counter()
            shm.read_array(name, np.empty((answer.num_tiles, 3, size, size), np.uint8))
            new.append(time.perf_counter() - start)
    finally:
        shm.unlink_segment(name)
    return min(old) * 1e3, min(new) * 1e3


async def pool_rate(images: list[bytes], num_workers: int, concurrency: int, run_dir: str) -> float:
    """Images per second through a pool of `num_workers` worker processes (0: a thread)."""
    procs, channels = [], []
    for rank in range(num_workers):
        path = os.path.join(run_dir, worker_socket(rank))
        procs.append(subprocess.Popen([sys.executable, __file__, "--serve", path]))
        channels.append(await ipc.connect_when_listening(path, Hello("bench"), 60))
    pool = PreprocessPool(TILING, f"{shm.segment_prefix(os.getpid())}bench-", channels)
    limit = asyncio.Semaphore(concurrency)
    held = shm.SharedBytes(f"{shm.segment_prefix(os.getpid())}bench-")  # as the http actor holds them
    names = [held.acquire(str(i), data) for i, data in enumerate(images)]

    async def one(data: bytes, bytes_shm: str) -> None:
        async with limit:
            answer, name = await pool.run(10**9, False, 0, bytes_shm, len(data), data)
            assert not answer.error_kind, answer.error
            shm.unlink_segment(name)

    start = time.perf_counter()
    await asyncio.gather(*(one(data, name) for data, name in zip(images, names, strict=True)))
    elapsed = time.perf_counter() - start
    for name in names:
        held.release(name)
    for proc in procs:
        proc.terminate()
        proc.wait()
    return len(images) / elapsed


async def serve(path: str) -> None:
    """A stand-in preprocess worker on `path` (the server's needs a launch file)."""

    async def on_channel(channel: ipc.Channel) -> None:
        await channel.recv()
        while True:
            channel.send(preprocess_job(await channel.recv(), TILING, 0))

    server = await ipc.serve(path, on_channel)
    async with server:
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=1344)
    parser.add_argument("--height", type=int, default=896)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.serve:
        asyncio.run(serve(ns.serve))
        return
    images = [png(ns.width, ns.height, seed) for seed in range(ns.images)]
    old, new = leader_ms(images[0], ns.repeats)
    print(f"ViT leader per image: decode + tile + normalise {old:.1f} ms -> read tiles {new:.1f} ms")
    with tempfile.TemporaryDirectory() as run_dir:
        for num_workers in (0, 1, 2):
            rate = asyncio.run(pool_rate(images, num_workers, ns.concurrency, run_dir))
            print(f"pool, {num_workers} worker process(es): {rate:.1f} images/s")


if __name__ == "__main__":
    main()
