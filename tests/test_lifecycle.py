"""Start-up checks, orderly shutdown and crash clean-up of the whole process tree."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from tests import conftest
from tests.conftest import start_server


def serve(*flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlmd", "serve", *flags],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(result: subprocess.CompletedProcess, flag: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and flag in lines[0], result.stderr


def test_visual_dp_times_visual_tp_must_equal_tp(model_dir):
    assert_one_line_error(serve("--model_dir", str(model_dir), "--visual_dp", "2"), "--visual_dp")


def test_missing_model_dir(tmp_path):
    assert_one_line_error(serve("--model_dir", str(tmp_path / "nope")), "--model_dir")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    result = serve("--model_dir", str(tmp_path))
    assert_one_line_error(result, "--model_dir")
    assert "llama" in result.stderr


def test_image_length_must_agree_with_the_model(model_dir):
    result = serve("--model_dir", str(model_dir), env={"INTERNVL_IMAGE_LENGTH": "128"})
    assert_one_line_error(result, "INTERNVL_IMAGE_LENGTH")


def test_bad_loadworker(model_dir):
    assert_one_line_error(serve("--model_dir", str(model_dir), env={"LOADWORKER": "many"}), "LOADWORKER")


def test_an_embed_store_larger_than_dev_shm_stops_serve_with_advice(model_dir):
    """Refused before anything is allocated: more than the whole of /dev/shm, whatever others use."""
    stats = os.statvfs("/dev/shm")
    too_many_mb = stats.f_blocks * stats.f_frsize // 2**20 + 1
    result = serve("--model_dir", str(model_dir), "--enable_multimodal", "--embed_store_mb", str(too_many_mb))
    assert_one_line_error(result, "--embed_store_mb")
    line = next(line for line in result.stderr.splitlines() if "error" in line)
    assert "--shm-size" in line and "lower --embed_store_mb" in line and f"needs {too_many_mb} MiB" in line


def test_seed_flags_and_env_are_accepted(model_dir, tmp_path):
    server = start_server(
        model_dir,
        tmp_path,
        "--mem_fraction",
        "0.8",
        "--trust_remote_code",
        "--enable_multimodal",
        "--visual_infer_batch_size",
        "2",
        "--cache_capacity",
        "500",
        "--visual_dp",
        "1",
        "--visual_tp",
        "1",
        "--tp",
        "1",
        env={"INTERNVL_IMAGE_LENGTH": "256", "LOADWORKER": "12"},
    )
    try:
        response = requests.post(
            server.url + "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}
        )
        assert response.status_code == 200
    finally:
        assert server.stop() == 0


def test_sigterm_stops_everything_and_leaks_nothing(model_dir, tmp_path):
    server = start_server(model_dir, tmp_path, "--enable_multimodal", "--preprocess_workers", "2")
    assert len(server.actor_pids()) == 6  # scheduler, worker, vision, http, 2 preprocess workers
    assert server.shm_segments()
    assert server.stop(signal.SIGTERM) == 0
    assert server.actor_pids() == [] and server.shm_segments() == []
    assert not any(name.startswith(f"vlmd-{server.server_id}-") for name in os.listdir("/tmp"))


def kill_actor_and_expect_clean_stop(server, role: str, rank: int | None = None) -> None:
    """SIGKILL one actor (`rank` None: the only one of its role); the server must exit non-zero,
    name the dead actor and leave no process or shared memory behind."""
    # python -m vlmd.actors ROLE RUN_DIR RANK
    wanted = [role] if rank is None else [role, str(rank)]
    victim = next(pid for pid in server.actor_pids() if _cmdline(pid).split()[3::2][: len(wanted)] == wanted)
    os.kill(victim, signal.SIGKILL)
    assert server.process.wait(timeout=60) != 0
    name = role if rank is None else f"{role}{rank}"
    assert f"actor {name}" in server.log() and "died" in server.log() and "killed by signal 9" in server.log()
    deadline = time.monotonic() + 10
    while server.actor_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.actor_pids() == [] and server.shm_segments() == []


@pytest.mark.parametrize("role", ["worker", "vision", "scheduler", "http", "preprocess"])
def test_a_killed_actor_takes_the_server_down_cleanly(model_dir, tmp_path, role):
    server = start_server(model_dir, tmp_path, "--enable_multimodal")
    kill_actor_and_expect_clean_stop(server, role)


def test_supervisor_killed_takes_actors_with_it(model_dir, tmp_path):
    server = start_server(model_dir, tmp_path, "--enable_multimodal")
    pids = server.actor_pids()
    server.stop(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)
    # Nobody was left to unlink the segments; the next server start must not trip over them.
    for name in server.shm_segments():
        os.unlink(f"/dev/shm/{name}")


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_workers_load_beside_the_vit_and_size_kv_after_it(model_dir, tmp_path):
    """Workers start with the vision ranks but size their KV cache only once the ViT is ready
    (VisionLoaded): with the vision actor held stopped, the worker loads and then waits."""
    started: list = []
    thread = threading.Thread(
        target=lambda: started.append(start_server(model_dir, tmp_path, "--enable_multimodal")), daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 60
    vision = None
    while vision is None and time.monotonic() < deadline:
        server = next((s for s in conftest._started if s.log_path.parent == tmp_path), None)
        with contextlib.suppress(LookupError):
            vision = server.actor_pid("vision") if server else None
        time.sleep(0.01)
    os.kill(vision, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 120
        while "rank 0: weights " not in server.log():  # the worker loaded, and waits
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        time.sleep(1)  # a worker that did not wait would be ready by now
        assert " worker0 ready " not in server.log()
    finally:
        os.kill(vision, signal.SIGCONT)
    thread.join(60)
    lines = server.log().splitlines()
    ready = {line.split(" ready ")[0].split()[-1]: line for line in lines if " ready (" in line}
    assert lines.index(ready["vision"]) < lines.index(ready["worker0"])
    # Each Ready line says what its start spent time on.
    worker = ready["worker0"]
    assert "weights " in worker and "waiting for the ViT " in worker and "KV cache " in worker, worker
    assert "weights " in ready["vision"]
    assert started[0].stop() == 0 and server.actor_pids() == [] and server.shm_segments() == []
