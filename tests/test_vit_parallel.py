"""The ViT layouts: --visual_tp splits InternViT's heads and MLP over ranks (gloo on the CPU),
--visual_dp runs whole replicas; both give one rank's embeddings and transformers' tokens."""

from __future__ import annotations

import argparse
import base64
import io
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from tests.conftest import free_port, make_image, start_server
from tests.test_http import metrics
from tests.test_lifecycle import assert_one_line_error, kill_actor_and_expect_clean_stop, serve
from tests.test_parity import (
    CASES,
    IMG_A,
    IMG_B,
    IMG_C,
    chat,
    hf_prompt,
    vlmd_generate,
)
from vlmd import shm
from vlmd.actors.preprocess import preprocess_job
from vlmd.actors.vit_replica import VisionLayout, ViTRank
from vlmd.config import add_serve_arguments, build_server_args
from vlmd.demo import write_demo_model
from vlmd.image import TilingConfig, decode_image, num_tiles, preprocess
from vlmd.messages import EmbedRun, ImageRef, PreprocessImage
from vlmd.models.loader import load_vision
from vlmd.models.tensor_parallel import SINGLE_RANK, TPGroup, end_rank_process

# InternViT-6B's variant: RMSNorm blocks, qk-norm across all heads, no qkv bias, a final LayerNorm.
VIT_6B_LIKE = {
    "use_qk_norm": True,
    "norm_type": "rms_norm",
    "attention_bias": False,
    "use_mean_pooling": False,
}


def _pixels() -> torch.Tensor:
    return torch.randn(3, 3, 448, 448, generator=torch.Generator().manual_seed(0))  # [tiles, 3, H, W]


def _sharded_vit_main(rank: int, size: int, port: int, model_dir: str, result_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        with torch.inference_mode():
            rows = load_vision(model_dir, torch.float32, "cpu", tp=TPGroup(rank, size))(_pixels())
        if rank == 0:
            torch.save(rows, result_path)
    finally:
        dist.barrier()  # no rank tears down its connections while a peer still uses them
        dist.destroy_process_group()


@pytest.mark.parametrize(("variant", "size"), [("demo", 2), ("demo", 4), ("vit_6b_like", 2)])
def test_sharded_vit_gives_the_single_rank_rows(model_dir, tmp_path, variant, size):
    if variant == "vit_6b_like":
        model_dir = tmp_path / "model"
        write_demo_model(model_dir, seed=5, vision_config=VIT_6B_LIKE)
    with torch.inference_mode():
        want = load_vision(model_dir, torch.float32, "cpu")(_pixels())  # [tiles * 256, hidden]
    path = str(tmp_path / "rows.pt")
    mp.spawn(_sharded_vit_main, args=(size, free_port(), str(model_dir), path), nprocs=size)
    torch.testing.assert_close(torch.load(path), want, rtol=1e-5, atol=1e-5)


def test_sharded_vit_holds_only_its_share(model_dir):
    model = load_vision(model_dir, torch.float32, "cpu", tp=TPGroup(1, 2))  # no collective runs at load
    whole = load_vision(model_dir, torch.float32, "cpu")
    attn, mlp = model.vision_tower.encoder.layer[0].attention, model.vision_tower.encoder.layer[0].mlp
    ref_attn = whole.vision_tower.encoder.layer[0].attention
    hidden = model.arch.vision_hidden_size
    assert attn.num_heads == model.arch.vision_num_attention_heads // 2
    assert attn.qkv_proj.weight.shape == (3 * hidden // 2, hidden)
    q_rows = ref_attn.qkv_proj.weight[hidden // 2 : hidden]  # rank 1 holds the second half of the heads
    torch.testing.assert_close(attn.qkv_proj.weight[: hidden // 2], q_rows, rtol=0, atol=0)
    assert mlp.fc1.weight.shape[0] == mlp.fc2.weight.shape[1] == model.arch.vision_intermediate_size // 2
    assert attn.projection_layer.bias.shape == (hidden,)  # added once, after the all-reduce


# --- the ViT ranks in process: every layout writes one rank's rows into the one EmbedStore --------

IMAGES = [IMG_A, IMG_C, IMG_B]  # 7, 1 and 3 tiles
ROWS_PER_TILE = 256


def _image_refs(model_dir, image_bytes: shm.SharedBytes) -> tuple[list[ImageRef], list[EmbedRun]]:
    """Each image's bytes in a segment `image_bytes` holds, its tiles in a segment of its own (as a
    preprocess worker writes them), and its run in the store."""
    tiling = TilingConfig.from_model_dir(model_dir)
    refs, runs, offset = [], [], 0
    for i, data in enumerate(IMAGES):
        tiles = num_tiles(*Image.open(io.BytesIO(data)).size, tiling)
        rows = tiles * ROWS_PER_TILE
        segment = image_bytes.acquire(f"md5-{i}", data)
        pixels = f"{image_bytes.prefix}px-{i}"
        answer = preprocess_job(PreprocessImage(i, data, pixels, 10**8), tiling)
        assert answer.num_tiles == tiles and not answer.error_kind
        refs.append(ImageRef(f"md5-{i}", segment, len(data), tiles, 0, rows, pixels_shm=pixels))
        runs.append(EmbedRun(f"md5-{i}", offset, rows))
        offset += rows
    return refs, runs


def test_tiles_reach_the_vit_normalised_as_preprocess_makes_them(model_dir):
    """Tiles travel as uint8 and are normalised by the ViT's rank: the float32 pixels it runs on
    are the bits `vlmd.image.preprocess` gives (transformers' and OpenGVLab's normalisation)."""
    prefix = f"vlmd-{os.getpid()}-test-norm-"
    image_bytes = shm.SharedBytes(prefix)
    refs, _ = _image_refs(model_dir, image_bytes)
    tiling = TilingConfig.from_model_dir(model_dir)
    try:
        vit = ViTRank(load_vision(model_dir, torch.float32, "cpu"), tiling)
        pixels, counts, errors = vit.load_pixels(refs)
        want = np.concatenate([preprocess(decode_image(data), tiling) for data in IMAGES])
        assert counts == [ref.num_tiles for ref in refs] and errors == ["", "", ""]
        assert pixels.dtype == torch.float32 and pixels.is_contiguous()
        assert np.array_equal(pixels.numpy(), want)  # the same bits
    finally:
        shm.unlink_all(prefix)


def _store(segment: shm.SharedSegment, hidden: int) -> torch.Tensor:
    return torch.frombuffer(segment.buf, dtype=torch.float32).view(-1, hidden)  # [rows, hidden]


def _vision_rank_main(
    rank, visual_tp, visual_dp, ports, model_dir, store_name, refs, runs, cuda=False
) -> None:
    """Vision rank `rank`: the leader of group g encodes images g, g + dp, ... into their runs."""
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.allow_tf32 = False  # float32 convolutions, to compare with the CPU's rows
    layout = VisionLayout(rank, visual_tp, visual_dp)
    tp = SINGLE_RANK
    if visual_tp > 1:
        init = f"tcp://127.0.0.1:{ports[layout.group]}"
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend, init_method=init, rank=layout.rank_in_group, world_size=visual_tp)
        tp = TPGroup(layout.rank_in_group, visual_tp)
    model = load_vision(model_dir, torch.float32, device, tp=tp)
    segment = shm.SharedSegment.attach(store_name)
    vit = ViTRank(model, TilingConfig.from_model_dir(model_dir), tp, _store(segment, model.arch.hidden_size))
    mine = list(range(layout.group, len(refs), visual_dp))
    if layout.is_leader:
        pixels, counts, errors = vit.load_pixels([refs[i] for i in mine])
        assert not any(errors), errors
        vit.forward_into_store(pixels, counts, [runs[i] for i in mine])
    else:
        vit.follow(sum(refs[i].num_tiles for i in mine))
    end_rank_process(visual_tp)


@pytest.mark.parametrize(
    ("visual_tp", "visual_dp", "cuda"),
    [
        (2, 1, False),
        (1, 2, False),
        (2, 2, False),
        pytest.param(2, 1, True, marks=pytest.mark.gpu),  # NCCL between two GPUs
        pytest.param(1, 2, True, marks=pytest.mark.gpu),
    ],
)
def test_every_vit_layout_writes_the_single_rank_rows(model_dir, visual_tp, visual_dp, cuda):
    """With dp 2, group 1 encodes IMG_C alone: a batch of one tile, whose pixels come out of the
    decoder strided (they must reach a tensor-parallel group's broadcast contiguous)."""
    if cuda and torch.cuda.device_count() < visual_tp * visual_dp:
        pytest.skip(f"needs {visual_tp * visual_dp} GPUs")
    prefix = f"vlmd-{os.getpid()}-test-"
    image_bytes = shm.SharedBytes(prefix)
    refs, runs = _image_refs(model_dir, image_bytes)
    hidden = load_vision(model_dir, torch.float32, "cpu").arch.hidden_size
    num_rows = sum(run.num_rows for run in runs)
    want = shm.SharedSegment.create(f"{prefix}want", num_rows * hidden * 4)
    got = shm.SharedSegment.create(f"{prefix}got", num_rows * hidden * 4)
    try:
        single = ViTRank(load_vision(model_dir, torch.float32, "cpu"), TilingConfig.from_model_dir(model_dir))
        single.store = _store(want, hidden)
        pixels, counts, _ = single.load_pixels(refs)
        single.forward_into_store(pixels, counts, runs)
        ports = [free_port() for _ in range(visual_dp)]
        args = (visual_tp, visual_dp, ports, str(model_dir), got.name, refs, runs, cuda)
        mp.spawn(_vision_rank_main, args=args, nprocs=visual_tp * visual_dp)
        tolerance = 1e-4 if cuda else 1e-5  # another device's float32 kernels round differently
        torch.testing.assert_close(_store(got, hidden), _store(want, hidden), rtol=tolerance, atol=tolerance)
        assert _store(got, hidden).abs().sum(-1).min() > 0, "a row was never written"
    finally:
        del single
        for segment in (want, got):
            segment.close()
        for ref in refs:  # the encoders read the tiles and leave them to their holder
            image_bytes.release(ref.bytes_shm)
            shm.unlink_segment(ref.pixels_shm)
        assert [name for name in shm.unlink_all(prefix) if "img-" in name or "px-" in name] == []


# --- through the real server ---------------------------------------------------------------------


@pytest.fixture(scope="module", params=["process", "worker"], ids=lambda placement: f"vit_in_{placement}")
def dp2_placement(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def vit_dp2_server(model_dir, tmp_path_factory, dp2_placement):
    server = start_server(
        model_dir,
        tmp_path_factory.mktemp("vit_dp2"),
        "--tp",
        "2",
        "--visual_dp",
        "2",
        "--visual_tp",
        "1",
        "--enable_multimodal",
        "--preprocess_workers",
        "1",
        "--vit_placement",
        dp2_placement,
    )
    yield server
    assert server.stop() == 0
    assert server.actor_pids() == [] and server.shm_segments() == []


@pytest.mark.parametrize("case", ["one_image", "two_images"])
def test_vit_dp2_greedy_tokens_equal_transformers(vit_dp2_server, dp2_placement, reference, case):
    prompt, _, images = CASES[case]
    assert vlmd_generate(vit_dp2_server, prompt, images) == reference.generate(hf_prompt(prompt), images)
    # With the ViT in the LM workers the one vision process is the front, which holds no ViT.
    num_vision = {"process": 2, "worker": 1}[dp2_placement]
    roles = {"scheduler": 1, "worker": 2, "vision": num_vision, "http": 1, "preprocess": 1}
    assert vit_dp2_server.actor_roles() == roles


def test_vit_dp2_both_replicas_encode(vit_dp2_server, reference):
    before = metrics(vit_dp2_server)
    images = [make_image(460, 460, seed=seed) for seed in (80, 81, 82, 83)]
    prompt = chat("<img></img> Describe.")
    expected = [reference.generate(hf_prompt(prompt), [image], 8) for image in images]
    with ThreadPoolExecutor(len(images)) as pool:
        got = list(pool.map(lambda image: vlmd_generate(vit_dp2_server, prompt, [image], 8), images))
    assert got == expected
    after = metrics(vit_dp2_server)
    done = [
        after[f'vlmd_vit_replica_images_total{{replica="{g}"}}']
        - before.get(f'vlmd_vit_replica_images_total{{replica="{g}"}}', 0)
        for g in (0, 1)
    ]
    assert sum(done) == len(images) and min(done) > 0, done


@pytest.mark.parametrize(
    "flags",
    [
        ("--tp", "2", "--visual_tp", "2", "--visual_dp", "2"),  # 4 ViT shares on 2 GPUs
        ("--tp", "2", "--visual_tp", "0"),
        ("--tp", "4", "--visual_dp", "3"),
    ],
)
def test_inconsistent_vit_layouts_are_refused(model_dir, flags):
    assert_one_line_error(serve("--model_dir", str(model_dir), "--enable_multimodal", *flags), "--visual_")


def test_vit_in_the_workers_needs_one_whole_replica_per_worker(model_dir):
    flags = ("--model_dir", str(model_dir), "--enable_multimodal", "--vit_placement", "worker")
    result = serve(*flags, "--tp", "2", "--visual_tp", "2")
    assert_one_line_error(result, "--vit_placement")
    assert "--visual_tp 1" in result.stderr
    # Without a layout given, worker placement means one replica per worker (not one split ViT).
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = build_server_args(parser.parse_args([*flags, "--tp", "2"]), environ={})
    assert (args.visual_dp, args.visual_tp, args.vit_in_workers) == (2, 1, True)


def test_vit_step_tiles_needs_the_vit_in_the_workers(model_dir):
    flags = ("--model_dir", str(model_dir), "--enable_multimodal", "--vit_step_tiles", "2")
    assert_one_line_error(serve(*flags), "--vit_step_tiles")
    assert_one_line_error(serve(*flags[:-1], "-1", "--vit_placement", "worker"), "--vit_step_tiles")
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = build_server_args(parser.parse_args([*flags, "--vit_placement", "worker"]), environ={})
    assert (args.vit_step_tiles, args.vit_in_workers) == (2, True)


def test_vit_sms_needs_the_unsliced_vit_in_the_workers(model_dir):
    flags = ("--model_dir", str(model_dir), "--enable_multimodal", "--vit_sms", "32")
    assert_one_line_error(serve(*flags), "--vit_sms")  # the ViT in a process of its own
    assert_one_line_error(serve(*flags, "--vit_placement", "worker", "--vit_step_tiles", "1"), "--vit_sms")
    assert_one_line_error(serve(*flags[:-1], "-1", "--vit_placement", "worker"), "--vit_sms")
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = build_server_args(parser.parse_args([*flags, "--vit_placement", "worker"]), environ={})
    assert (args.vit_sms, args.vit_in_workers) == (32, True)


def test_visual_tp_that_does_not_divide_the_vit_heads_is_refused(tmp_path):
    write_demo_model(tmp_path, seed=0, vision_config={"num_attention_heads": 2})
    result = serve("--model_dir", str(tmp_path), "--enable_multimodal", "--tp", "4")  # visual_tp 4
    assert_one_line_error(result, "--visual_tp")
    assert "vision_num_attention_heads" in result.stderr


@pytest.mark.parametrize("layout", [("--visual_tp", "2"), ("--visual_dp", "2")], ids=["tp_peer", "dp_leader"])
def test_a_dead_vision_rank_stops_the_server_cleanly(model_dir, tmp_path, layout):
    server = start_server(model_dir, tmp_path, "--tp", "2", "--enable_multimodal", *layout)
    kill_actor_and_expect_clean_stop(server, "vision", 1)


def test_a_dead_worker_hosting_a_replica_stops_the_server_cleanly(model_dir, tmp_path):
    """--vit_placement worker: LM worker 1, leader of replica 1, is killed while images are being
    encoded; the server stops, every client gets an answer and nothing is left (no process, no
    EmbedStore, no image bytes or tiles in /dev/shm). The front is held stopped until every
    request is in the scheduler (preprocessing is slower than this ViT: the encodes would be
    over), then let go, and the worker killed once the first batch is done."""
    server = start_server(
        model_dir, tmp_path, "--tp", "2", "--enable_multimodal", "--vit_placement", "worker"
    )
    images = [make_image(900, 600, seed=seed) for seed in range(100, 124)]  # 7 tiles each
    front = server.actor_pid("vision")
    os.kill(front, signal.SIGSTOP)
    with ThreadPoolExecutor(len(images)) as pool:
        try:
            clients = [pool.submit(_ask_about, server, image) for image in images]
            _wait_for_metrics(
                server, lambda v: v["vlmd_requests_running"] + v["vlmd_requests_waiting"] == len(images)
            )
        finally:
            os.kill(front, signal.SIGCONT)
        values = _wait_for_metrics(server, lambda v: v.get("vlmd_vit_images_total", 0) > 0)
        kill_actor_and_expect_clean_stop(server, "worker", 1)
        statuses = [client.result(timeout=30) for client in clients]
    assert values["vlmd_vit_images_total"] < len(images), "the encodes were over before the kill"
    assert set(statuses) <= {200, 503}, statuses


def _wait_for_metrics(server, condition, timeout_s: float = 60) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while not condition(values := metrics(server)):
        assert time.monotonic() < deadline, values
        time.sleep(0.02)
    return values


def _ask_about(server, image: bytes) -> int | str:
    body = {
        "inputs": "<img></img> Describe.",
        "parameters": {"max_new_tokens": 4},
        "multimodal_params": {"images": [{"type": "base64", "data": base64.b64encode(image).decode()}]},
    }
    try:
        return requests.post(server.url + "/generate", json=body, timeout=60).status_code
    except requests.RequestException as exc:
        return type(exc).__name__


def test_step_turns_slice_the_vit_only_while_requests_decode():
    """--vit_step_tiles: the ViT's thread waits for a collected step before each slice while the
    newest step has decode rows; steps of prompt chunks only, and an idle worker, let it run."""
    from vlmd.actors.hosted_vit import StepTurns

    turns = StepTurns()

    def start_waiting() -> threading.Event:
        returned = threading.Event()
        threading.Thread(target=lambda: (turns.wait(), returned.set()), daemon=True).start()
        return returned

    assert start_waiting().wait(5)  # idle: at once
    turns.step_launched(decoding=True)
    waiting = start_waiting()
    assert not waiting.wait(0.2)  # a decode step runs: the slice waits for it
    turns.step_collected()
    assert waiting.wait(5)
    waiting = start_waiting()
    assert not waiting.wait(0.2)  # the turn was used: the next slice waits for the next step
    turns.step_launched(decoding=False)  # a step of prompt chunks only: free
    assert waiting.wait(5) and start_waiting().wait(5)
    turns.step_launched(decoding=True)
    waiting = start_waiting()
    assert not waiting.wait(0.2)
    turns.idle()
    assert waiting.wait(5)
