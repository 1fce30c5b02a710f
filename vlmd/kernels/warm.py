"""FlashInfer's JIT modules compiled ahead, one process per module, all at once.

FlashInfer compiles a module (batch prefill or decode for a dtype and head dim; the norm, rope,
activation and page modules) on its first use, and a process meets them one after another: on a
cold H100 the worker's first step compiled prefill 60 s, norm 28 s, rope 36 s, page 14 s and
activation 5 s in a row. Each job here is a process that builds vlmd's own backend or ops and runs
them once on small tensors, so it compiles exactly the modules vlmd loads; the jobs run in
parallel, FlashInfer's file locks make a process that needs a module being built wait for it, and
the built modules stay in FLASHINFER_WORKSPACE_BASE for every later process.

`vlmd serve` starts the jobs its model needs in LM worker 0 before it loads the weights
(`Precompile(model_jobs(...))`), and waits for them (`Precompile.wait`) before it sizes the KV cache, so that their
CUDA contexts are gone by then. For benches and tests:

    python -m vlmd.kernels.warm                 # the tiny models' and the 8B shapes' modules
    python -m vlmd.kernels.warm --jobs prefill:bf16:128 decode-tc:bf16:128 ops
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import IO

import torch

from vlmd.kernels.attention import BatchLayout, KVCacheSpec

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# The GPU tests' and benches' modules: the tiny models (head dim 64) and the 8B shapes (128),
# bf16, and float16 at 128.
DEFAULT_JOBS = (
    *(f"{kind}:{dtype}:{head_dim}" for kind in ("prefill", "decode", "decode-tc")
      for dtype, head_dim in (("bf16", 128), ("bf16", 64), ("fp16", 128))),
    "ops",
)  # fmt: skip
PAGE_SIZE = 16
WAIT_TIMEOUT_S = 900  # a cold compile of one module took minutes at most on an H100
log = logging.getLogger("vlmd.kernels")


def model_jobs(
    head_dim: int, num_q_heads: int, num_kv_heads: int, dtype: torch.dtype, vit_head_dim: int | None
) -> list[str]:
    """The jobs a model served with FlashInfer needs: its prefill and decode modules (tensor-core
    decode for GQA groups of 4 or more, as FlashInferBackend picks), the decoder ops, and the
    ViT's attention (the same batch prefill module family) when `vit_head_dim` is given."""
    name = DTYPE_NAMES[dtype]
    decode = "decode-tc" if num_q_heads // num_kv_heads >= 4 else "decode"
    jobs = [f"prefill:{name}:{head_dim}", f"{decode}:{name}:{head_dim}", "ops"]
    if vit_head_dim is not None and vit_head_dim != head_dim:
        jobs.append(f"prefill:{name}:{vit_head_dim}")
    return jobs


def run_attention(kind: str, dtype: torch.dtype, head_dim: int) -> None:
    """One prefill or decode step through FlashInferBackend: compiles that wrapper's module and
    the page module (append_paged_kv_cache)."""
    from vlmd.kernels.flashinfer_backend import FlashInferBackend

    q_heads, kv_heads = (8, 8) if kind == "decode" else (16, 4)
    spec = KVCacheSpec(1, 8, PAGE_SIZE, kv_heads, head_dim, dtype, torch.device("cuda"))
    backend = FlashInferBackend(spec, q_heads, head_dim**-0.5, decode_use_tensor_cores=kind == "decode-tc")
    new = 20 if kind == "prefill" else 1
    backend.plan(BatchLayout.from_page_tables([0, new], [new], [[0, 1]], PAGE_SIZE))
    q = torch.randn(new, q_heads, head_dim, dtype=dtype, device="cuda")
    k, v = torch.randn(2, new, kv_heads, head_dim, dtype=dtype, device="cuda")
    backend.forward(0, q, k, v)
    torch.cuda.synchronize()


def run_ops() -> None:
    """The decoder's fused ops (norm, rope, silu_and_mul) in both half-precision dtypes."""
    from vlmd.kernels.ops import FlashInferOps

    ops = FlashInferOps()
    for dtype in DTYPES.values():
        x = torch.randn(4, 256, dtype=dtype, device="cuda")
        w = torch.ones(256, dtype=dtype, device="cuda")
        ops.rms_norm(x, w, 1e-6)
        ops.add_rms_norm(x.clone(), x.clone(), w, 1e-6)
        ops.silu_and_mul(torch.randn(4, 512, dtype=dtype, device="cuda"))
        q, k = torch.randn(2, 4, 4, 64, dtype=dtype, device="cuda")
        ops.rope(q, k, torch.arange(4, device="cuda"), None, 10000.0)
    torch.cuda.synchronize()


def run_job(job: str) -> None:
    if job == "ops":
        return run_ops()
    kind, dtype, head_dim = job.split(":")
    assert kind in ("prefill", "decode", "decode-tc"), job
    run_attention(kind, DTYPES[dtype], int(head_dim))


def _die_with_parent(parent: int) -> None:
    """In a job's process: end when the process that started it ends, however it ends."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent:
        sys.exit(1)  # it ended before the request took hold


@dataclass
class Job:
    name: str
    process: subprocess.Popen
    stderr: IO[bytes]  # the child's output, read back if it fails
    ended: float | None = None


class Precompile:
    """Jobs running in processes of their own; `wait` reaps them."""

    def __init__(self, jobs: list[str]) -> None:
        self.started = time.perf_counter()
        self.jobs = []
        for name in jobs:
            stderr = tempfile.TemporaryFile()
            process = subprocess.Popen(
                [sys.executable, "-m", "vlmd.kernels.warm", "--one", name, "--parent", str(os.getpid())],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
            self.jobs.append(Job(name, process, stderr))

    def wait(self, timeout_s: float = WAIT_TIMEOUT_S) -> str:
        """Until every job has ended (those still running after `timeout_s` are killed); what
        each took, for the start-up log. A job that failed is logged with the end of its output
        and costs nothing else: its module is compiled where it is first used, as without this."""
        while any(job.ended is None for job in self.jobs):
            for job in self.jobs:
                if job.ended is None and job.process.poll() is not None:
                    job.ended = time.perf_counter()
            if time.perf_counter() - self.started > timeout_s:
                self.stop()
                continue
            time.sleep(0.05)
        done = []
        for job in self.jobs:
            rc, took = job.process.returncode, job.ended - self.started
            if rc != 0:
                job.stderr.seek(0)
                tail = job.stderr.read()[-1500:].decode(errors="replace")
                log.warning("kernel precompile %s failed (exit %s): %s", job.name, rc, tail)
            job.stderr.close()
            done.append(f"{job.name} {'failed' if rc else f'{took:.0f} s'}")
        return ", ".join(done)

    def stop(self) -> None:
        """Kill the jobs still running."""
        for job in self.jobs:
            if job.process.poll() is None:
                job.process.kill()
                job.process.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", nargs="+", default=list(DEFAULT_JOBS))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a job's process: run this job
    parser.add_argument("--parent", type=int, help=argparse.SUPPRESS)  # ... started by this process
    args = parser.parse_args(argv)
    if args.one:
        if args.parent is not None:
            _die_with_parent(args.parent)
        return run_job(args.one)
    started = time.perf_counter()
    precompile = Precompile(args.jobs)
    summary = precompile.wait()
    failed = [job.name for job in precompile.jobs if job.process.returncode]
    print(f"warm: {summary}")
    print(f"warm: {len(args.jobs) - len(failed)}/{len(args.jobs)} in {time.perf_counter() - started:.0f} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
