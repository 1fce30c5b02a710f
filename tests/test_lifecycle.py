"""Start-up checks, orderly shutdown and crash clean-up of the whole process tree."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import pytest
import requests

from tests import conftest
from tests.conftest import make_image, start_server
from tests.test_http import metrics


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


@pytest.mark.parametrize(
    ("role", "placement"),
    [
        *[(role, "process") for role in ("worker", "vision", "scheduler", "http", "preprocess")],
        ("worker", "worker"),  # the LM worker and the ViT replica it hosts
        ("vision", "worker"),  # the front, whose replica leaders are the workers
    ],
)
def test_a_killed_actor_takes_the_server_down_cleanly(model_dir, tmp_path, role, placement):
    """Under load: with 32 requests in flight (text and images, half of them streamed), every
    client ends within seconds of the kill, none hangs; unless the http actor itself died, each
    gets an answer (a 503 or a stream's error event), not a dropped connection or a 500. With
    --vit_placement worker too."""
    server = start_server(model_dir, tmp_path, "--enable_multimodal", "--vit_placement", placement)
    with ThreadPoolExecutor(NUM_CLIENTS) as pool:
        clients = [pool.submit(client, server, i) for i in range(NUM_CLIENTS)]
        wait_in_flight(server, clients)
        killed_at = time.monotonic()
        kill_actor_and_expect_clean_stop(server, role)
        done, hung = wait(clients, timeout=max(0.0, killed_at + CLIENT_BOUND_S - time.monotonic()))
    assert not hung, f"{len(hung)} client(s) still waiting {CLIENT_BOUND_S} s after the kill"
    outcomes = [future.result() for future in done]
    # Without its scheduler the http actor answers every request: only its own death drops them.
    allowed = {"complete", "dropped"} if role == "http" else {"complete", "answered"}
    assert {outcome for outcome, _ in outcomes} <= allowed, outcomes
    assert max(ended_at for _, ended_at in outcomes) - killed_at < CLIENT_BOUND_S


def test_a_request_waiting_on_a_dead_preprocess_worker_gets_a_503(model_dir, tmp_path):
    """The http actor is waiting for a preprocess worker's tiles when the worker dies: the client
    gets a JSON 503 saying the server is stopping, not a plain-text 500 or a dropped connection."""
    server = start_server(model_dir, tmp_path, "--enable_multimodal", "--preprocess_workers", "1")
    worker = server.actor_pid("preprocess")
    os.kill(worker, signal.SIGSTOP)  # the job waits in its socket
    image = base64.b64encode(make_image(640, 480, seed=99)).decode()
    body = {"inputs": "<img></img>describe", "parameters": {"max_new_tokens": 2}}
    body["multimodal_params"] = {"images": [{"type": "base64", "data": image}]}
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(requests.post, server.url + "/generate", json=body, timeout=60)
        time.sleep(1.0)  # the request reaches the http actor's wait for the stopped worker
        os.kill(worker, signal.SIGKILL)
        response = answer.result()
    assert response.status_code == 503, response.text
    assert "preprocessing worker is gone" in response.json()["error"]
    assert server.process.wait(timeout=60) != 0
    deadline = time.monotonic() + 10
    while server.actor_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.actor_pids() == [] and server.shm_segments() == []


NUM_CLIENTS = 32
CLIENT_BOUND_S = 10.0  # from the kill to the last client's end
IMAGES = [base64.b64encode(make_image(448, 448, seed=seed)).decode() for seed in range(4)]


def client(server, i: int) -> tuple[str, float]:
    """Request i of the load, and how the client saw it end: "complete", "answered" (an error
    status with a JSON error, or a stream's error event), "dropped" (the connection closed with
    no answer) or "hang" (nothing for 60 s)."""
    stream, image, openai_api = i % 2 == 1, IMAGES[i % 4] if i % 4 >= 2 else None, i % 8 >= 4
    if openai_api:
        content = [{"type": "text", "text": f"request {i}: a long answer please"}]
        if image:
            url = "data:image/png;base64," + image
            content.append({"type": "image_url", "image_url": {"url": url}})
        messages = [{"role": "user", "content": content}]
        body = {"messages": messages, "max_tokens": 2000, "ignore_eos": True, "stream": stream}
        path = "/v1/chat/completions"
    else:
        params = {"max_new_tokens": 2000, "ignore_eos": True}
        body = {"inputs": ("<img></img>" if image else "") + f"request {i}: a long answer please"}
        body |= {
            "parameters": params,
            "multimodal_params": {"images": [{"type": "base64", "data": image}] if image else []},
        }
        path = "/generate_stream" if stream else "/generate"
    try:
        with requests.post(server.url + path, json=body, stream=stream, timeout=60) as response:
            text = (
                "".join(line.decode() + "\n" for line in response.iter_lines()) if stream else response.text
            )
        outcome = _outcome(response.status_code, text, stream)
    except requests.Timeout:
        outcome = "hang"
    except requests.RequestException:
        outcome = "dropped"
    return outcome, time.monotonic()


def _outcome(status: int, text: str, stream: bool) -> str:
    if stream and status == 200:
        payloads = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
        last = json.loads(payloads[-1] if payloads[-1] != "[DONE]" else payloads[-2]) if payloads else {}
        if "error" in last:
            return "answered"
        finished = last.get("finished") or last.get("choices", [{}])[0].get("finish_reason")
        return "complete" if finished else "other"
    try:
        body = json.loads(text)
    except ValueError:
        return "other"  # e.g. a plain-text 500
    if status == 200:
        return "complete"
    return "answered" if status >= 400 and "error" in body else "other"


def wait_in_flight(server, clients: list, timeout_s: float = 60) -> None:
    """Until every request is running or waiting in the scheduler (none finished yet)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        values = metrics(server)
        if values["vlmd_requests_running"] + values["vlmd_requests_waiting"] >= len(clients):
            break
        time.sleep(0.1)
    assert not any(future.done() for future in clients), [f.result() for f in clients if f.done()]
    assert values["vlmd_requests_running"] + values["vlmd_requests_waiting"] >= len(clients), values


def test_a_slow_http_actor_still_answers_its_clients_after_a_death(model_dir, tmp_path):
    """The supervisor stops the http actor last, once it has answered: here it is paused when
    the scheduler dies, and resumes only after the supervisor has stopped the rest."""
    server = start_server(model_dir, tmp_path, "--enable_multimodal")
    with ThreadPoolExecutor(4) as pool:
        clients = [pool.submit(client, server, i) for i in (0, 1, 4, 5)]  # text, both APIs
        wait_in_flight(server, clients)
        http = server.actor_pid("http")
        os.kill(http, signal.SIGSTOP)
        try:
            os.kill(server.actor_pid("scheduler"), signal.SIGKILL)
            time.sleep(1.0)  # past the supervisor's DEATH_REPORT_GRACE_S
        finally:
            _resume(http)
        outcomes = [future.result(timeout=CLIENT_BOUND_S) for future in clients]
    assert {outcome for outcome, _ in outcomes} == {"answered"}, outcomes
    assert server.process.wait(timeout=30) != 0
    assert server.actor_pids() == [] and server.shm_segments() == []


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


def _start_in_background(model_dir, log_dir, *flags: str) -> tuple[threading.Thread, list, conftest.Server]:
    """`start_server` in a thread (it returns once /health answers); the server as soon as it runs."""
    started: list = []
    thread = threading.Thread(
        target=lambda: started.append(start_server(model_dir, log_dir, *flags)), daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 60
    while (server := next((s for s in conftest._started if s.log_path.parent == log_dir), None)) is None:
        assert time.monotonic() < deadline, "the server never started"
        time.sleep(0.01)
    return thread, started, server


def _actor_pid(server: conftest.Server, role: str, timeout_s: float = 60) -> int:
    """The pid of the server's `role` actor, as soon as it is spawned."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(LookupError):
            return server.actor_pid(role)
        assert time.monotonic() < deadline, f"no {role} actor:\n{server.log()}"
        time.sleep(0.01)


def _ready_lines(server: conftest.Server) -> tuple[list[str], dict[str, str]]:
    """The log's lines, and each actor's "ready" line by actor name."""
    lines = server.log().splitlines()
    return lines, {line.split(" ready ")[0].split()[-1]: line for line in lines if " ready (" in line}


def test_workers_load_beside_the_vit_and_size_kv_after_it(model_dir, tmp_path):
    """Workers start with the vision ranks but size their KV cache only once the ViT is ready
    (VisionLoaded): with the vision actor held stopped, the worker loads and then waits."""
    thread, started, server = _start_in_background(model_dir, tmp_path, "--enable_multimodal")
    vision = _actor_pid(server, "vision")
    os.kill(vision, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 120
        while "the KV cache is sized once the ViT holds its memory" not in server.log():  # loaded, waits
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        time.sleep(1)  # a worker that did not wait would be ready by now
        assert " worker0 ready " not in server.log()
    finally:
        os.kill(vision, signal.SIGCONT)
    thread.join(60)
    lines, ready = _ready_lines(server)
    assert lines.index(ready["vision"]) < lines.index(ready["worker0"])
    # Each Ready line says what its start spent time on.
    worker = ready["worker0"]
    assert "weights " in worker and "waiting for the ViT " in worker and "KV cache " in worker, worker
    assert "weights " in ready["vision"]
    # Their first phase is their imports, counted apart from the weights.
    assert all(re.search(r"ready \(imports [0-9.]+ s, ", ready[name]) for name in ("vision", "worker0")), (
        ready
    )
    assert started[0].stop() == 0 and server.actor_pids() == [] and server.shm_segments() == []


def test_the_http_actor_loads_beside_the_workers_and_serves_after_them(model_dir, tmp_path):
    """The http actor starts with the LM workers: it loads its tokenizer and binds its port while
    they load (a taken port fails the start at once, not after the weights), and serves only once
    they are ready (StartServing). With the worker held stopped, the port is already taken and
    nothing answers on it; the http actor's Ready line counts the wait."""
    thread, started, server = _start_in_background(model_dir, tmp_path)
    worker = _actor_pid(server, "worker")
    os.kill(worker, signal.SIGSTOP)
    held_s = 3.0
    try:
        _actor_pid(server, "http")
        port = int(server.url.rsplit(":", 1)[1])
        deadline = time.monotonic() + 60
        while True:  # until the http actor holds the port
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    break
            assert time.monotonic() < deadline, f"the http actor never bound its port:\n{server.log()}"
            time.sleep(0.05)
        with pytest.raises(requests.ConnectionError):
            requests.get(server.url + "/health", timeout=5)
        time.sleep(held_s)
        assert " worker0 ready " not in server.log() and " http ready " not in server.log()
    finally:
        os.kill(worker, signal.SIGCONT)
    thread.join(60)
    lines, ready = _ready_lines(server)
    assert lines.index(ready["worker0"]) < lines.index(ready["http"])
    assert re.search(r"; imports [0-9.]+ s, tokenizer and image checks [0-9.]+ s, ", ready["http"]), ready[
        "http"
    ]
    waited = re.search(r"waiting for the LM workers ([0-9.]+) s", ready["http"])
    assert waited and float(waited[1]) >= held_s, ready["http"]
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    assert started[0].stop() == 0 and server.actor_pids() == []


def _resume(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def test_every_actor_freezes_its_start_up_objects_before_it_serves(mm_server):
    """Each actor collects its start-up's garbage and freezes what is left out of the cyclic
    garbage collector's passes (a full pass over a worker's imports took 35 ms on the CPU VM),
    and says so in the log."""
    log = mm_server.log()
    frozen = dict(re.findall(r"(\w+): (\d+) start-up objects frozen out of the garbage collector", log))
    for actor in ("scheduler0", "worker0", "vision0", "http0", "preprocess0"):
        assert int(frozen.get(actor, 0)) > 10_000, (actor, frozen)


def test_log_stalls_names_an_actor_whose_event_loop_was_held(caplog):
    """--log_stalls_ms: an actor's event loop held by a callback's host work (every message it
    should pass on waits meanwhile) is logged with the actor's name and how long."""
    import asyncio
    import logging

    from vlmd.actors.launch import watch_loop

    caplog.set_level(logging.INFO, logger="vlmd.launch")

    async def scenario() -> None:
        watch = asyncio.create_task(watch_loop("http0", 0.05))
        await asyncio.sleep(0.02)
        time.sleep(0.2)  # the loop held
        await asyncio.sleep(0.02)
        watch.cancel()

    asyncio.run(scenario())
    held = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stall: http0's event loop")]
    assert len(held) == 1, held
    assert 180 <= float(re.search(r"held ([0-9.]+) ms", held[0]).group(1)) < 1000, held


def test_log_stalls_names_an_actor_whose_garbage_collection_was_long(caplog):
    """--log_stalls_ms: a pass of the cyclic garbage collector that long (it holds the GIL: the
    event loop and every thread wait) is logged with the actor's name, the generation and how
    many objects it collected; a shorter one is not."""
    import gc
    import logging

    from vlmd.actors.launch import watch_gc

    caplog.set_level(logging.INFO, logger="vlmd.launch")

    def collect_cycles(count: int) -> None:
        gc.disable()  # the cycles wait for the one full pass
        try:
            for _ in range(count):
                a, b = [], []
                a.append(b)
                b.append(a)
        finally:
            gc.enable()
        gc.collect()

    for name, threshold_s in (("scheduler0", 0.0), ("http0", 60.0)):
        callback = watch_gc(name, threshold_s)
        try:
            collect_cycles(50_000)
        finally:
            gc.callbacks.remove(callback)
    logged = [r.getMessage() for r in caplog.records if "garbage collection" in r.getMessage()]
    assert len(logged) == 1, logged
    assert logged[0].startswith("stall: scheduler0's garbage collection of generation 2 ("), logged
    assert int(re.search(r"\((\d+) objects collected\)", logged[0]).group(1)) >= 100_000, logged
