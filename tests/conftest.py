"""Shared fixtures: the demo model on disk and real `vlmd serve` processes on loopback."""

from __future__ import annotations

import ctypes
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from vlmd.demo import write_demo_model

SERVER_START_TIMEOUT_S = 180
# A server on CUDA may JIT-compile FlashInfer's norm, rope, activation, prefill and decode modules
# on first use: several minutes on a machine whose kernel cache is cold (seen on the device: a
# demo-model start still compiling rope 150 s in).
GPU_SERVER_START_TIMEOUT_S = 900


def pytest_addoption(parser):
    parser.addoption(
        "--long",
        action="store_true",
        help="soak mode: many more fuzzing examples (tests/test_fuzz.py), drawn afresh on each run",
    )


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "demo"
    write_demo_model(path, seed=0)
    return path


@pytest.fixture(scope="session")
def reference(model_dir):
    """transformers' InternVL on the demo model in float32: the token-for-token oracle (one per
    session: the parity, tensor-parallel and ViT-layout tests share it)."""
    from tests.test_parity import Reference

    return Reference(model_dir)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_image(width: int, height: int, seed: int, fmt: str = "PNG") -> bytes:
    """A deterministic image with structure at several scales, so tiles differ from each other."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.NEAREST), dtype=np.int16)
    noise = rng.integers(-40, 40, (height, width, 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path

    @property
    def server_id(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def actor_pids(self) -> list[int]:
        """Live processes started by this server (their command line names its run dir)."""
        marker = f"vlmd-{self.server_id}-".encode()
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        if marker in f.read():
                            pids.append(int(entry))
                except OSError:
                    pass
        return pids

    def actor_roles(self) -> Counter[str]:
        """How many live actors of each role this server runs."""
        roles: Counter[str] = Counter()
        for pid in self.actor_pids():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    roles[f.read().split(b"\0")[3].decode()] += 1  # python -m vlmd.actors ROLE ...
            except (OSError, IndexError):
                pass
        return roles

    def actor_pid(self, role: str) -> int:
        """The pid of the actor of this role (of rank 0): `python -m vlmd.actors ROLE RUN_DIR RANK`."""
        for pid in self.actor_pids():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if argv[2:4] == [b"vlmd.actors", role.encode()] and argv[5:6] in ([b"0"], []):
                return pid
        raise LookupError(f"no {role} actor")

    def shm_segments(self) -> list[str]:
        return [n for n in os.listdir("/dev/shm") if n.startswith(f"vlmd-{self.server_id}-")]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal the supervisor and wait for it; SIGTERM drains for up to --shutdown_timeout (30 s)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


def start_server(
    model_dir: Path,
    log_dir: Path,
    *flags: str,
    env: dict | None = None,
    new_session: bool = False,
    prefix: list[str] = (),
) -> Server:
    """`new_session`: the server leads a process group of its own, which a test may signal as a
    terminal's Ctrl-C does (os.killpg), without signalling pytest. `prefix`: a command that runs
    the server's command line (it must exec it, keeping the pid)."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    cmd = [*prefix, sys.executable, "-m", "vlmd", "serve", "--model_dir", str(model_dir), "--port", str(port)]
    cmd += flags
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=new_session,
            preexec_fn=_stop_with_pytest if threading.current_thread() is threading.main_thread() else None,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    _started.append(server)
    on_gpu = "cuda" in flags
    deadline = time.monotonic() + (GPU_SERVER_START_TIMEOUT_S if on_gpu else SERVER_START_TIMEOUT_S)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if requests.get(server.url + "/health", timeout=1).status_code == 200:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server did not become healthy:\n{server.log()}")


_started: list[Server] = []


def _stop_with_pytest() -> None:
    """In the server's process before it runs: SIGTERM (an orderly stop) when pytest dies. A
    pytest killed by `timeout` on the device runs no finalizer, and a server left behind kept the
    GPU and FlashInfer's compile locks from the commands after it. The signal comes when the
    forking thread ends, so only servers started on pytest's main thread ask for it."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@pytest.fixture(scope="session", autouse=True)
def _stop_every_server():
    """A failed test must not leave a server running."""
    yield
    for server in _started:
        if server.process.poll() is None:
            try:
                server.stop(signal.SIGTERM)  # an orderly stop unlinks its shared memory
            except subprocess.TimeoutExpired:
                server.stop(signal.SIGKILL)
        for name in server.shm_segments():  # a server killed by a test leaves its segments
            os.unlink(f"/dev/shm/{name}")


MM_FLAGS = (
    "--enable_multimodal",
    "--visual_infer_batch_size",
    "4",
    "--max_body_bytes",
    str(8 * 2**20),
    "--image_fetch_timeout",
    "2",
    "--allow_private_image_urls",  # the tests' image hosts listen on loopback
)


@pytest.fixture(scope="session")
def mm_server(model_dir, tmp_path_factory):
    """One multimodal server shared by the tests that only send requests to it."""
    yield from serve_until_done(model_dir, tmp_path_factory, *MM_FLAGS)


@pytest.fixture(scope="session")
def mm_worker_server(model_dir, tmp_path_factory):
    """mm_server with the ViT inside the LM worker (--vit_placement worker)."""
    yield from serve_until_done(model_dir, tmp_path_factory, *MM_FLAGS, "--vit_placement", "worker")


def serve_until_done(model_dir, tmp_path_factory, *flags: str):
    """A fixture's server: started with `flags`, stopped when the fixture ends, and then no actor
    process and no shared-memory segment may be left."""
    server = start_server(model_dir, tmp_path_factory.mktemp("logs"), *flags)
    yield server
    assert server.stop() == 0, server.log()
    assert server.actor_pids() == [] and server.shm_segments() == []


@pytest.fixture(scope="session")
def text_server(model_dir, tmp_path_factory):
    """A server without --enable_multimodal, serving the model under another name."""
    server = start_server(
        model_dir,
        tmp_path_factory.mktemp("logs"),
        "--max_req_total_len",
        "600",
        "--served_model_name",
        "text-demo",
    )
    yield server
    assert server.stop() == 0, server.log()
