"""An image's bytes in the http actor (issue 16, item 2): what its event loop spends on each image a
request sends in base64 before anything else happens to it (the base64 decoded, the MD5 that keys
the caches). A chat client sends its whole history, images included, with every turn: a resent
image costs the http actor this much each time, and one http actor serves every request.

For each image (`vlmd bench`'s own images: a 13-tile 1792x1344 PNG, a 1-tile 448x448 JPEG):

- per image: the ms `ImageChecker.check` takes for an image it has seen (its size remembered,
  so no preprocess worker is asked), one at a time, median of `--repeats`;
- held: the longest the event loop was held meanwhile: the most a task that wakes every
  millisecond (standing for the token streams the actor forwards) woke late;
- 8 at once: images/s with eight such checks in flight (`--concurrency`).

And for new images (`--new_images` 13-tile PNGs, 4 at a time, as serve_bench sends them), what
the http actor does with each before it is submitted: checked (the preprocess pool, one worker
process, decodes and tiles it) and held for its request (`HeldImages.hold`), then let go of:
the longest the loop was held, and the sum of how late the millisecond task woke, less its
lateness on an idle loop (the loop's time on the images, roughly).

    python bench/image_bytes_bench.py [--repeats 20] [--concurrency 8] [--new_images 16]

Run it on two commits in one command to compare them (bench/RESULTS.md gives the command).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import inspect
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import preprocess_bench  # bench/: its stand-in preprocess worker

from vlmd import ipc, shm
from vlmd.actors.fetch import ImageFetcher
from vlmd.actors.images import HeldImages, ImageChecker
from vlmd.actors.preprocess import PreprocessPool, worker_socket
from vlmd.actors.tokenizer import ImageSpan
from vlmd.api import ImageInput
from vlmd.benchmark.dataset import make_image
from vlmd.image import TilingConfig
from vlmd.messages import Hello

IMAGES = (("13-tile 1792x1344 PNG", 1792, 1344, "png"), ("1-tile 448x448 JPEG", 448, 448, "jpeg"))


class LoopWatch:
    """A task that wakes every millisecond, as a token stream's forwarding would: the most it woke
    late is the longest the loop was held."""

    PERIOD_S = 0.001

    def __init__(self) -> None:
        self.longest = 0.0
        self.total = 0.0  # of the late wake-ups
        self.ticks = 0
        self._task: asyncio.Task | None = None

    async def _tick(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(self.PERIOD_S)
            late = time.perf_counter() - start - self.PERIOD_S
            self.longest, self.total, self.ticks = max(self.longest, late), self.total + late, self.ticks + 1

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._tick())

    def stop(self) -> None:
        self._task.cancel()


async def measure(data: bytes, repeats: int, concurrency: int) -> dict[str, float]:
    checker = ImageChecker(
        TilingConfig(), ImageFetcher(10.0, 64 << 20, allow_private=False), max_pixels=10**9
    )
    image = ImageInput(type="base64", data=base64.b64encode(data).decode())
    checker.release([await checker.check(0, image)])  # new: decoded once; its size is remembered
    watch = LoopWatch()
    watch.start()
    await asyncio.sleep(0)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        checker.release([await checker.check(0, image)])
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(repeats // concurrency or 1):
        checker.release(await checker.check_all([image] * concurrency))
    rate = (repeats // concurrency or 1) * concurrency / (time.perf_counter() - start)
    watch.stop()
    return {"ms": statistics.median(times) * 1e3, "held_ms": watch.longest * 1e3, "rate": rate}


async def measure_new(images: list[bytes], concurrency: int, run_dir: str) -> dict[str, float]:
    """New images checked and held as the http actor does, `concurrency` at a time, with one
    preprocess worker process."""
    path = os.path.join(run_dir, worker_socket(0))
    worker = subprocess.Popen([sys.executable, preprocess_bench.__file__, "--serve", path])
    prefix = shm.segment_prefix(os.getpid())
    try:
        channel = await ipc.connect_when_listening(path, Hello("bench"), 60)
        pool = PreprocessPool(TilingConfig(), f"{prefix}px-bench-", [channel])
        held = HeldImages(prefix)
        fetcher = ImageFetcher(10.0, 64 << 20, allow_private=False)
        # The checker writes the bytes the request then holds; a commit before d33955f has no
        # `image_bytes` (its hold wrote them), so the same file compares both.
        shares = (
            {"image_bytes": held.bytes} if "image_bytes" in inspect.signature(ImageChecker).parameters else {}
        )
        checker = ImageChecker(TilingConfig(), fetcher, 10**9, pool, held.pixels, **shares)
        inputs = [ImageInput(type="base64", data=base64.b64encode(data).decode()) for data in images]
        limit = asyncio.Semaphore(concurrency)

        async def one(image: ImageInput) -> None:
            async with limit:
                checked = await checker.check_all([image])
                span = ImageSpan(0, checked[0].num_tiles * 256)
                _, segments, pixel_segments = held.hold(checked, [span])
                checker.release(checked)
                held.release(segments, pixel_segments)

        await one(inputs[0])  # warm
        idle = LoopWatch()  # how late a wake-up comes on an idle loop, taken off below
        idle.start()
        await asyncio.sleep(0.5)
        idle.stop()
        watch = LoopWatch()
        watch.start()
        start = time.perf_counter()
        await asyncio.gather(*(one(image) for image in inputs[1:]))
        elapsed = time.perf_counter() - start
        watch.stop()
    finally:
        worker.terminate()
        worker.wait()
    return {
        "held_ms": watch.longest * 1e3,
        "busy_ms": (watch.total - watch.ticks * idle.total / idle.ticks) * 1e3 / (len(images) - 1),
        "rate": (len(images) - 1) / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--new_images", type=int, default=16)
    args = parser.parse_args()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# An image's bytes in the http actor, {platform.machine()} {now}")
    print(f"repeats {args.repeats}, {args.concurrency} at once\n")
    print(f"| image | bytes | ms per image | loop held, longest ms | images/s, {args.concurrency} at once |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for name, width, height, image_format in IMAGES:
        data = make_image(width, height, rng, image_format)
        figures = asyncio.run(measure(data, args.repeats, args.concurrency))
        print(
            f"| {name} | {len(data)} | {figures['ms']:.2f} | {figures['held_ms']:.2f} | {figures['rate']:.1f} |",
            flush=True,
        )

    rng = np.random.default_rng(1)
    news = [make_image(1792, 1344, rng, "png") for _ in range(args.new_images + 1)]
    with tempfile.TemporaryDirectory() as run_dir:
        figures = asyncio.run(measure_new(news, 4, run_dir))
    print(
        f"\n{args.new_images} new 13-tile 1792x1344 PNGs, 4 at a time, checked and held (one preprocess worker):"
    )
    print("| loop held, longest ms | loop late beyond idle, sum per image ms | images/s |")
    print("|---|---|---|")
    print(f"| {figures['held_ms']:.2f} | {figures['busy_ms']:.2f} | {figures['rate']:.2f} |")


if __name__ == "__main__":
    main()
