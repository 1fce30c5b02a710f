"""Image preprocessing in the pool (--preprocess_workers): each image decoded once per request path,
tiles handed to the ViT through shared memory, bit for bit what `vlmd.image.tile_image` cuts (the
ViT normalises them: tests/test_vit_parallel.py), and nothing left behind, whatever happens to the
request."""

from __future__ import annotations

import asyncio
import base64
import errno
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import msgspec
import numpy as np
import pytest
import requests

from tests.conftest import make_image, start_server
from tests.test_http import metrics
from vlmd import shm
from vlmd.actors.fetch import ImageFetcher
from vlmd.actors.images import BadImage, ImageChecker, NoSharedMemory
from vlmd.actors.pixels import BYTES_GONE, FrontPixels
from vlmd.actors.preprocess import BAD_IMAGE, NO_BYTES, TOO_LARGE, PreprocessPool, preprocess_job
from vlmd.api import ImageInput
from vlmd.image import TilingConfig, decode_image, downscale, fit_within, tile_image
from vlmd.messages import ImageRef, PreprocessImage

TILING = TilingConfig()
PREFIX = f"vlmd-{os.getpid()}-test-px-"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def read_tiles(name: str, num_tiles: int) -> np.ndarray:
    size = TILING.tile_size
    out = np.empty((num_tiles, 3, size, size), np.uint8)
    shm.read_array(name, out)
    return out


def my_segments() -> list[str]:
    return [name for name in os.listdir(shm.SHM_DIR) if name.startswith(f"vlmd-{os.getpid()}-")]


# --- the job a worker runs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "max_tiles", "max_pixels", "resize"),
    [
        (1344, 896, 0, 10**8, False),  # 6 tiles and the thumbnail
        (300, 200, 0, 10**8, False),  # one tile: its array comes out strided
        (800, 500, 2, 10**8, False),  # a request's tile limit
        (900, 600, 0, 200_000, True),  # resize_to_fit
    ],
)
def test_worker_tiles_are_bit_identical_to_tile_image(width, height, max_tiles, max_pixels, resize):
    data = make_image(width, height, seed=width)
    name = f"{PREFIX}{width}"
    answer = preprocess_job(PreprocessImage(1, data, name, max_pixels, resize, max_tiles), TILING, 3)
    try:
        assert (answer.error_kind, answer.worker, answer.width, answer.height) == ("", 3, width, height)
        image = decode_image(data)
        if resize:
            image = downscale(image, *fit_within(width, height, max_pixels))
        want = tile_image(image, TILING.with_max_tiles(max_tiles))
        assert answer.num_tiles == want.shape[0]
        assert np.array_equal(read_tiles(name, answer.num_tiles), want)  # the same bits
    finally:
        shm.unlink_segment(name)


def test_worker_errors_are_answers_and_leave_no_segment(monkeypatch):
    data = make_image(600, 400, seed=5)
    truncated = preprocess_job(PreprocessImage(1, data[:300], f"{PREFIX}t", 10**8), TILING)
    assert truncated.error_kind == BAD_IMAGE and "truncated" in truncated.error
    too_large = preprocess_job(PreprocessImage(2, data, f"{PREFIX}l", 1000), TILING)
    assert (too_large.error_kind, too_large.width, too_large.height) == (TOO_LARGE, 600, 400)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shm.SharedSegment, "create", full)
    no_room = preprocess_job(PreprocessImage(3, data, f"{PREFIX}f", 10**8), TILING)
    assert no_room.error_kind == "no_shm"
    assert my_segments() == []


def test_a_job_reads_the_bytes_from_the_askers_segment():
    data = make_image(800, 500, seed=12)
    image_bytes = shm.SharedBytes(f"{PREFIX}b-")
    held = image_bytes.acquire("k", data)  # as the http actor holds them
    tiles = f"{PREFIX}from-segment"
    try:
        job = PreprocessImage(1, b"", tiles, 10**8, bytes_shm=held, num_bytes=len(data))
        answer = preprocess_job(job, TILING)
        assert answer.error_kind == ""
        want = tile_image(decode_image(data), TILING)
        assert np.array_equal(read_tiles(tiles, answer.num_tiles), want)
    finally:
        shm.unlink_segment(tiles)
        image_bytes.release(held)
    gone = preprocess_job(PreprocessImage(2, b"", f"{PREFIX}g", 10**8, bytes_shm=held, num_bytes=9), TILING)
    assert gone.error_kind == NO_BYTES
    assert my_segments() == []


# --- the http actor's side: the checker and its pool --------------------------------------------


def checker(**kwargs) -> ImageChecker:
    return ImageChecker(TILING, ImageFetcher(1.0, 2**24, allow_private=False), 10**8, **kwargs)


def test_a_checked_image_holds_its_bytes_in_shared_memory_once_per_md5():
    data = make_image(700, 500, seed=13)

    async def scenario() -> None:
        images = checker()
        first = await images.check(0, ImageInput("base64", b64(data)))  # new: preprocessed
        again = await images.check(0, ImageInput("base64", b64(data), max_dynamic_patch=2))
        assert first.bytes_shm and again.bytes_shm == first.bytes_shm  # one segment per MD5
        assert first.md5 != again.md5  # though their embed keys differ
        assert shm.read_segment(first.bytes_shm, len(data)) == data
        assert len(images.bytes) == 1
        images.release([first, again])
        assert len(images.bytes) == 0 and len(images.pixels) == 0

    asyncio.run(scenario())
    assert my_segments() == []


def test_a_failed_image_lets_go_of_the_tiles_of_the_others():
    good, bad = make_image(700, 500, seed=6), make_image(700, 500, seed=7)[:400]

    async def scenario() -> None:
        images = checker()
        with pytest.raises(BadImage, match="image 1: truncated"):
            await images.check_all([ImageInput("base64", b64(good)), ImageInput("base64", b64(bad))])
        assert len(images.pixels) == 0
        await asyncio.sleep(2.0)  # the good image's job, cancelled, ends: its tiles are unlinked

    asyncio.run(scenario())
    assert my_segments() == []


def test_a_caller_cancelled_mid_preprocess_leaves_no_tiles():
    data = make_image(2000, 1500, seed=8)

    async def scenario() -> None:
        pool = PreprocessPool(TILING, PREFIX)  # in process: a thread
        task = asyncio.ensure_future(pool.run(10**8, False, 0, "", len(data), data))
        await asyncio.sleep(0.01)  # the thread is decoding
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(3.0)  # the thread finishes and writes the tiles, which are unlinked
        assert pool.num_images == [0]

    asyncio.run(scenario())
    assert my_segments() == []


@pytest.mark.parametrize("segment", ["bytes", "tiles"])
def test_a_full_dev_shm_is_no_shared_memory(monkeypatch, segment):
    create = shm.SharedSegment.create

    def full_for(cls, name, num_bytes):
        if ("-img-" in name) == (segment == "bytes"):  # the bytes' segment, or the tiles'
            raise OSError(errno.ENOSPC, "No space left on device")
        return create(name, num_bytes)

    monkeypatch.setattr(shm.SharedSegment, "create", classmethod(full_for))
    images = checker()
    with pytest.raises(NoSharedMemory, match=f"no shared memory for an image's {segment}"):
        asyncio.run(images.check(0, ImageInput("base64", b64(make_image(300, 300, seed=9)))))
    assert len(images.bytes) == 0 and my_segments() == []


def test_shared_pixels_count_holders_per_key():
    pixels = shm.SharedPixels()
    for name in ("a", "b"):
        shm.SharedSegment.create(f"{PREFIX}{name}", 8).close()
    first = pixels.adopt("key", f"{PREFIX}a")
    assert pixels.adopt("key", f"{PREFIX}b") == first  # a second preprocess of the key is dropped
    assert not os.path.exists(f"/dev/shm/{PREFIX}b")
    assert pixels.acquire("key") == first and pixels.acquire("other") == ""
    for _ in range(2):
        pixels.release(first)
    assert os.path.exists(f"/dev/shm/{first}")
    pixels.release(first)
    assert not os.path.exists(f"/dev/shm/{first}") and pixels.acquire("key") == "" and len(pixels) == 0


def test_the_vision_front_links_the_tiles_or_has_the_bytes_preprocessed():
    data = make_image(800, 500, seed=11)
    want = tile_image(decode_image(data), TILING)

    async def scenario() -> None:
        pool = PreprocessPool(TILING, PREFIX)
        front = FrontPixels(pool, 10**8)
        image_bytes = shm.SharedBytes(f"{PREFIX}b-")
        bytes_name = image_bytes.acquire("k", data)
        tiles = f"{PREFIX}tiles"  # as the http actor holds them
        assert not preprocess_job(PreprocessImage(0, data, tiles, 10**8), TILING).error_kind
        ref = ImageRef("k", bytes_name, len(data), len(want), 0, len(want) * 256, pixels_shm=tiles)
        untiled = msgspec.structs.replace(ref, pixels_shm="")
        gone = ImageRef("g", f"{PREFIX}none", 10, 1, 0, 256)
        held = await front.hold([ref, untiled, gone])
        assert pool.num_images == [2]  # not the tiled one; the gone one's job found no bytes
        assert held.errors == ["", "", BYTES_GONE] and held.statuses[2] == 400
        shm.unlink_segment(tiles)  # the http actor lets go: the front's own name keeps the tiles
        for image in held.images[:2]:
            assert image.pixels_shm not in ("", tiles)
            assert np.array_equal(read_tiles(image.pixels_shm, len(want)), want)
        front.release(held)
        image_bytes.release(bytes_name)

    asyncio.run(scenario())
    assert my_segments() == []


# --- through the real server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    server = start_server(
        model_dir,
        tmp_path_factory.mktemp("preprocess"),
        "--enable_multimodal",
        "--preprocess_workers",
        "2",
        "--visual_infer_batch_size",
        "2",
    )
    yield server
    assert server.stop() == 0, server.log()
    assert server.actor_pids() == [] and server.shm_segments() == []


def body(*images: bytes, **image_options) -> dict:
    return {
        "inputs": "<img></img>" * len(images) + " describe",
        "parameters": {"max_new_tokens": 2},
        "multimodal_params": {
            "images": [{"type": "base64", "data": b64(i), **image_options} for i in images]
        },
    }


def generate(server, payload: dict) -> requests.Response:
    return requests.post(server.url + "/generate", json=payload, timeout=120)


def idle_segments(server) -> list[str]:
    """The server's segments once no request is in flight: the EmbedStore alone."""
    deadline = time.monotonic() + 30
    while len(server.shm_segments()) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    return server.shm_segments()


def test_each_image_is_decoded_once_per_request_path(server):
    data = make_image(900, 600, seed=101)
    start = metrics(server)

    def delta(name: str) -> float:
        return metrics(server)[name] - start[name]

    assert generate(server, body(data)).status_code == 200  # the http actor decodes and tiles it
    assert delta("vlmd_images_preprocessed_total") == 1 and delta("vlmd_vit_images_total") == 1
    assert generate(server, body(data)).status_code == 200  # a cache hit: nothing is decoded
    assert delta("vlmd_images_preprocessed_total") == 1 and delta("vlmd_vit_images_total") == 1
    # Known bytes at another tile limit: a cache miss, whose tiles the vision front has made once.
    assert generate(server, body(data, max_dynamic_patch=2)).status_code == 200
    assert delta("vlmd_images_preprocessed_total") == 2 and delta("vlmd_vit_images_total") == 2
    assert idle_segments(server) == [f"vlmd-{server.server_id}-embeds"]


def test_images_of_a_request_are_preprocessed_in_parallel_by_the_pool(server):
    images = [make_image(1344, 896, seed=seed) for seed in (102, 103)]
    before = metrics(server)
    response = generate(server, body(*images))
    assert response.status_code == 200, response.text
    after = metrics(server)
    for worker in ("0", "1"):  # the two jobs went out together: one to each worker
        key = f'vlmd_preprocess_worker_images_total{{worker="{worker}"}}'
        assert after[key] - before.get(key, 0) == 1, after
    assert idle_segments(server) == [f"vlmd-{server.server_id}-embeds"]


def test_concurrent_requests_share_the_pool_and_leave_no_segments(server):
    images = [make_image(1344, 896, seed=seed) for seed in range(110, 116)]
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda data: generate(server, body(data)).status_code, images))
    assert codes == [200] * 6
    assert idle_segments(server) == [f"vlmd-{server.server_id}-embeds"]


@pytest.mark.parametrize("cut", [0, 100, 2000])
def test_a_corrupt_image_is_a_400_naming_it_and_holds_nothing(server, cut):
    good, corrupt = make_image(640, 480, seed=120 + cut), make_image(640, 480, seed=130)[:cut]
    response = generate(server, body(good, corrupt))
    assert response.status_code == 400 and response.json()["error"].startswith("image 1: "), response.text
    assert idle_segments(server) == [f"vlmd-{server.server_id}-embeds"]
    assert generate(server, body(good)).status_code == 200


def test_a_client_gone_mid_preprocess_leaks_nothing(server):
    """The body is sent whole and the connection closed at once, while the pool decodes a large image."""
    payload = requests.Request("POST", server.url + "/generate", json=body(make_image(3000, 2000, seed=140)))
    prepared = payload.prepare()
    host, port = server.url.removeprefix("http://").split(":")
    before = metrics(server)["vlmd_images_preprocessed_total"]
    with socket.create_connection((host, int(port))) as sock:
        head = f"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        sock.sendall(f"{head}Content-Length: {len(prepared.body)}\r\n\r\n".encode() + prepared.body)
    deadline = time.monotonic() + 60
    while metrics(server)["vlmd_images_preprocessed_total"] == before:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert idle_segments(server) == [f"vlmd-{server.server_id}-embeds"]
    assert metrics(server)["vlmd_requests_queued"] == 0
    assert generate(server, body(make_image(300, 300, seed=141))).status_code == 200
