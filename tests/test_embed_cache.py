"""The MD5 embedding cache through a real server: LRU bounded by --cache_capacity."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import requests

from tests.conftest import make_image, start_server
from tests.test_http import GOOD_PROMPT, metrics
from vlmd import shm
from vlmd.actors.vision import Replica, VisionActor
from vlmd.messages import EmbedRun, EncodeImages, ImageRef, ImagesReady, VisionStats


def test_lru_evicts_beyond_cache_capacity(model_dir, tmp_path):
    server = start_server(model_dir, tmp_path, "--enable_multimodal", "--cache_capacity", "2")
    images = {name: make_image(460, 460, seed=seed) for seed, name in enumerate("ABC", start=40)}

    def send(name: str) -> None:
        body = {
            "inputs": GOOD_PROMPT,
            "parameters": {"max_new_tokens": 2},
            "multimodal_params": {
                "images": [{"type": "base64", "data": base64.b64encode(images[name]).decode()}]
            },
        }
        assert requests.post(server.url + "/generate", json=body, timeout=60).status_code == 200

    try:
        # A B A: one hit. C evicts the least recently used (B), so A hits and B misses again.
        for name in "ABACAB":
            send(name)
        values = metrics(server)
    finally:
        assert server.stop() == 0
    assert values["vlmd_embed_cache_misses_total"] == 4  # A, B, C, B
    assert values["vlmd_embed_cache_hits_total"] == 2  # A, A
    assert values["vlmd_vit_images_total"] == 4
    assert values["vlmd_embed_cache_evictions_total"] == 2  # B for C, then C for B


def test_full_cache_waits_for_pins_instead_of_failing(model_dir, tmp_path):
    """With room for one image, a second request's image waits until the first request ends."""
    from concurrent.futures import ThreadPoolExecutor

    server = start_server(model_dir, tmp_path, "--enable_multimodal", "--cache_capacity", "1")
    images = [base64.b64encode(make_image(460, 460, seed=seed)).decode() for seed in (60, 61)]

    def send(image: str, max_new_tokens: int, images_in_prompt: int = 1) -> requests.Response:
        body = {
            "inputs": "<img></img>" * images_in_prompt + " describe",
            "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos": True},
            "multimodal_params": {"images": [{"type": "base64", "data": image}] * images_in_prompt},
        }
        return requests.post(server.url + "/generate", json=body, timeout=120)

    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(send, images[0], 300)
            second = pool.submit(send, images[1], 4)
            assert first.result().status_code == 200 and second.result().status_code == 200
        values = metrics(server)
        two_distinct = {
            "inputs": "<img></img><img></img>",
            "multimodal_params": {"images": [{"type": "base64", "data": image} for image in images]},
        }
        refused = requests.post(server.url + "/generate", json=two_distinct, timeout=60)
    finally:
        assert server.stop() == 0
    assert values["vlmd_vit_images_total"] == 2
    assert refused.status_code == 400 and "--cache_capacity" in refused.json()["error"]


def wait_for(server, name: str, value: float, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while metrics(server)[name] != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}: {metrics(server)}"
        time.sleep(0.05)


def test_a_waiter_keeps_the_image_it_shares_when_its_first_sender_disconnects(model_dir, tmp_path):
    """B sends the image A sent while A's encode is still queued, so B waits on A's encode; A then
    disconnects. B must still get its answer: the image's bytes belong to every request that needs
    them, not to the first sender.

    The encode is held deterministically: with --cache_capacity 1, a running request H pins the one
    entry, so Y's encode waits in the vision queue until H ends."""
    server = start_server(model_dir, tmp_path, "--enable_multimodal", "--cache_capacity", "1")
    holder, contested = (base64.b64encode(make_image(460, 460, seed=s)).decode() for s in (70, 71))
    body_y = {
        "inputs": GOOD_PROMPT,
        "parameters": {"max_new_tokens": 8, "ignore_eos": True, "return_details": True},
        "multimodal_params": {"images": [{"type": "base64", "data": contested}]},
    }
    try:
        expected = requests.post(server.url + "/generate", json=body_y, timeout=60).json()["tokens"]
        body_h = {
            "inputs": GOOD_PROMPT,
            "parameters": {"max_new_tokens": 7000, "ignore_eos": True},
            "multimodal_params": {"images": [{"type": "base64", "data": holder}]},
        }
        h = requests.post(server.url + "/generate_stream", json=body_h, stream=True, timeout=60)
        h_events = h.iter_lines()  # kept: a dropped iterator closes the connection, aborting H
        next(h_events)  # H runs: its image fills the cache and evicted Y
        encoded = metrics(server)["vlmd_vit_images_total"]

        a = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=60)
        a.request("POST", "/generate", json.dumps(body_y), {"Content-Type": "application/json"})
        wait_for(server, "vlmd_requests_waiting", 1)  # A's encode of Y is queued
        with ThreadPoolExecutor(1) as pool:
            b = pool.submit(requests.post, server.url + "/generate", json=body_y, timeout=120)
            wait_for(server, "vlmd_requests_waiting", 2)  # B waits on A's encode
            a.close()
            wait_for(server, "vlmd_requests_waiting", 1)  # A is gone
            assert metrics(server)["vlmd_vit_images_total"] == encoded  # Y still not encoded
            h.close()  # H ends: its pin goes, Y is encoded
            answer = b.result()
        assert answer.status_code == 200, answer.text
        assert answer.json()["tokens"] == expected
        wait_for(server, "vlmd_requests_running", 0)
        assert server.shm_segments() == [f"vlmd-{server.server_id}-embeds"]
    finally:
        assert server.stop() == 0


def vision_actor(encode, batch_size: int, cache_capacity: int) -> tuple[VisionActor, SimpleNamespace]:
    """A real vision front with one stand-in replica (`encode`), and the channel whose `sent` list
    has what it sent to the scheduler."""
    launch = SimpleNamespace(
        args=SimpleNamespace(visual_infer_batch_size=batch_size, cache_capacity=cache_capacity),
        runtime=SimpleNamespace(embed_store_rows=100),
    )
    channel = SimpleNamespace(sent=[])
    channel.send = channel.sent.append
    return VisionActor(launch, channel, [Replica(0, encode)]), channel


def test_a_request_that_joins_an_encode_after_its_bytes_went_gets_its_own_encode():
    """The narrower form of the race above: A's encode is on a replica, A disconnects (its bytes
    are unlinked), the replica finds them gone, and only then C sends the same image. C must not
    inherit that failure: it gets an encode that reads the bytes C holds. A real vision front and
    real segments; the replica is a stand-in that reads the bytes when the test lets it."""
    read, answer = asyncio.Event(), asyncio.Event()

    async def encode(images: list[ImageRef], runs: list[EmbedRun]) -> list[str]:
        await read.wait()
        errors = []
        for image in images:
            try:
                shm.read_segment(image.bytes_shm, image.num_bytes)
                errors.append("")
            except FileNotFoundError:
                errors.append("the image's bytes are no longer available")
        await answer.wait()
        return errors

    async def scenario() -> list:
        actor, channel = vision_actor(encode, batch_size=1, cache_capacity=4)
        dispatch = asyncio.get_running_loop().create_task(actor.dispatch_loop())
        image_bytes = shm.SharedBytes(f"vlmd-{os.getpid()}-test-")
        data = make_image(64, 64, seed=1)

        def send(request_id: str) -> None:
            name = image_bytes.acquire("key", data)
            actor.on_encode(EncodeImages(request_id, [ImageRef("key", name, len(data), 1, 0, 10)]))

        send("A")
        await asyncio.sleep(0)  # dispatched: the replica has A's encode
        assert actor.jobs["key"].in_flight
        image_bytes.release(f"vlmd-{os.getpid()}-test-img-key")  # A disconnects
        actor.on_release("A")
        read.set()
        await asyncio.sleep(0)  # the replica found the bytes gone
        send("C")
        answer.set()
        for _ in range(10):
            await asyncio.sleep(0)
        dispatch.cancel()
        image_bytes.release(f"vlmd-{os.getpid()}-test-img-key")
        assert len(image_bytes) == 0
        return channel.sent

    sent = [msg for msg in asyncio.run(scenario()) if not isinstance(msg, VisionStats)]  # counters aside
    assert [type(msg) for msg in sent] == [ImagesReady], sent
    assert sent[0].request_id == "C"


def test_a_batch_that_fills_the_cache_leaves_the_next_image_queued_not_refused():
    """--cache_capacity 2, a batch size of 8, three new images queued at once: the first two fill
    the cache in one batch, and the third waits for that batch (and its requests' pins) to end;
    it is not refused as if no room could ever come."""
    encoded: list[list[str]] = []

    async def encode(images: list[ImageRef], runs: list[EmbedRun]) -> list[str]:
        encoded.append([image.md5 for image in images])
        await asyncio.sleep(0)
        return [""] * len(images)

    async def scenario() -> list:
        actor, channel = vision_actor(encode, batch_size=8, cache_capacity=2)
        for request_id in "ABC":
            image = ImageRef(f"md5-{request_id}", "unused", 1, 1, 0, 10)
            actor.on_encode(EncodeImages(request_id, [image]))
        dispatch = asyncio.get_running_loop().create_task(actor.dispatch_loop())
        for _ in range(10):
            await asyncio.sleep(0)
        ready_before_release = [msg.request_id for msg in channel.sent if isinstance(msg, ImagesReady)]
        actor.on_release("A")  # A's request ended: its image may be evicted
        for _ in range(10):
            await asyncio.sleep(0)
        dispatch.cancel()
        return ready_before_release, [msg for msg in channel.sent if not isinstance(msg, VisionStats)]

    ready_before_release, sent = asyncio.run(scenario())
    assert ready_before_release == ["A", "B"]
    assert [type(msg) for msg in sent] == [ImagesReady] * 3, sent
    assert encoded == [["md5-A", "md5-B"], ["md5-C"]]
