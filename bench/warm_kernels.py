"""Compile FlashInfer's JIT modules ahead, one process per module, all at once.

FlashInfer compiles each module (prefill or decode for a dtype and head dim, the norm, rope,
activation and page modules) on its first use, one after another: on a cold H100 the GPU tests
spent their whole time limit compiling before the first assertion. Each job here builds vlmd's
own backend or ops and runs them once, so the modules compiled are the ones vlmd loads; the
jobs run in parallel processes, and later processes find them in FLASHINFER_WORKSPACE_BASE.

    python bench/warm_kernels.py                 # what the GPU tests and the 8B-shaped benches use
    python bench/warm_kernels.py --jobs prefill:bf16:128 decode-tc:bf16:128 ops
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vlmd.kernels.attention import BatchLayout, KVCacheSpec  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_JOBS = (
    # the demo / tiny models (head dim 64) and the 8B shapes (128), bf16; float16 at 128 (tests)
    *(f"{kind}:{dtype}:{head_dim}" for kind in ("prefill", "decode", "decode-tc")
      for dtype, head_dim in (("bf16", 128), ("bf16", 64), ("fp16", 128))),
    "ops",
)  # fmt: skip
PAGE_SIZE = 16


def run_attention(kind: str, dtype: torch.dtype, head_dim: int) -> None:
    """One prefill or decode step through FlashInferBackend: compiles that wrapper's module and
    the page module (append_paged_kv_cache)."""
    from vlmd.kernels.flashinfer_backend import FlashInferBackend

    q_heads, kv_heads = (8, 8) if kind == "decode" else (16, 4)
    spec = KVCacheSpec(1, 8, PAGE_SIZE, kv_heads, head_dim, dtype, torch.device("cuda"))
    backend = FlashInferBackend(spec, q_heads, head_dim**-0.5, decode_use_tensor_cores=kind == "decode-tc")
    new = 20 if kind == "prefill" else 1
    layout = BatchLayout.from_page_tables([0, new], [new], [[0, 1]], PAGE_SIZE)
    backend.plan(layout)
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
    run_attention(kind, DTYPES[dtype], int(head_dim))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", nargs="+", default=list(DEFAULT_JOBS))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: run this job
    args = parser.parse_args()
    if args.one:
        return run_job(args.one)
    started = time.perf_counter()
    children = {
        job: (subprocess.Popen([sys.executable, __file__, "--one", job]), time.perf_counter())
        for job in args.jobs
    }
    failed = []
    for job, (child, _) in children.items():
        rc = child.wait()
        print(f"{job}: {'ok' if rc == 0 else f'FAILED rc {rc}'} by {time.perf_counter() - started:.0f} s")
        if rc:
            failed.append(job)
    print(
        f"warm_kernels: {len(children) - len(failed)}/{len(children)} in {time.perf_counter() - started:.0f} s"
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
