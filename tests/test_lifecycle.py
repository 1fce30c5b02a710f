"""Start-up checks, orderly shutdown and crash clean-up of the whole process tree."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import requests

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


def test_bad_step_timeout(model_dir):
    assert_one_line_error(serve("--model_dir", str(model_dir), "--step_timeout", "-1"), "--step_timeout")


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
    server = start_server(model_dir, tmp_path, "--enable_multimodal")
    assert len(server.actor_pids()) == 4  # scheduler, worker, vision, http
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


@pytest.mark.parametrize("role", ["worker", "vision", "scheduler", "http"])
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


def test_a_stopped_worker_is_found_hung_and_the_server_stops(model_dir, tmp_path):
    """SIGSTOP the worker mid-stream: past --step_timeout the scheduler fails the request (the
    client gets an error event naming the timeout), the server exits 1 with the reason logged,
    and nothing is left behind."""
    timeout_s = 3.0
    server = start_server(model_dir, tmp_path, "--step_timeout", str(timeout_s))
    # A step of each kind first: the first prefill and the first decode may take longer (compiles).
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 3}}
    assert requests.post(server.url + "/generate", json=body, timeout=60).status_code == 200
    worker = server.actor_pid("worker")
    body = {"inputs": "a long answer please", "parameters": {"max_new_tokens": 3000, "ignore_eos": True}}
    try:
        with requests.post(server.url + "/generate_stream", json=body, stream=True, timeout=60) as stream:
            lines = stream.iter_lines()
            assert any(next(lines).startswith(b"data:") for _ in range(4))
            os.kill(worker, signal.SIGSTOP)
            stopped_at = time.monotonic()
            events = [json.loads(line[5:]) for line in lines if line.startswith(b"data:")]
        code = server.process.wait(timeout=timeout_s + 20)
        took = time.monotonic() - stopped_at
    finally:
        _resume(worker)
    assert code == 1, server.log()
    assert timeout_s <= took < timeout_s + 10
    assert "--step_timeout" in events[-1]["error"] and events[-1]["finished"]
    assert "has not come back from worker0" in server.log() and "a worker is hung" in server.log()
    deadline = time.monotonic() + 10
    while server.actor_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.actor_pids() == [] and server.shm_segments() == []


def _resume(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
