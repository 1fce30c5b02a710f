"""One row times a weight matrix, for decode steps at batch 1: y = x @ W.T (+ bias), x [1, K],
W [N, K] row-major.

At batch 1 every linear layer of a decode step is a matrix-vector product: the time is the
weight bytes read plus a fixed cost per kernel (launch, the first loads' latency, the tail),
and at batch 1 those fixed costs are a large part of a step. cuBLAS's kernels read the small
matrices of a tensor-parallel rank (q/k/v at --tp 2: 16.5 MB) at 1.6-2x the time their bytes
take, often split over K with a second kernel to sum the parts (bench/RESULTS.md). Here one
Triton program owns `BLOCK_N` output columns and streams their weight rows in `BLOCK_K` slices,
the next slice loading while the last is summed (float32), the bias added at the end: one
kernel. On Hopper it is launched as a programmatic dependent (PDL): the weights never depend on
the kernel before it, so each program reads its first slice while that kernel still runs, and
waits for it only before reading x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmd.kernels.probe import built_or_fallback, require_triton, tl, triton

if triton is not None:  # the CUDA path only; a CPU install has no Triton

    @triton.jit
    def _gemv_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        y_ptr,
        N,
        K,
        stride_wn,
        HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PDL: tl.constexpr,
    ):
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns = weight rows
        ks = tl.arange(0, BLOCK_K)
        col_ok = cols[:, None] < N
        w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_wn + ks[None, :]
        # No kernel before this one writes the weights: launched as a programmatic dependent
        # (PDL), the first slice is read while that kernel still runs, and only then does the
        # program wait for it (for x).
        w = tl.load(w_ptrs, mask=col_ok & (ks[None, :] < K), other=0.0)
        if PDL:
            tl.extra.cuda.gdc_wait()
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + k + ks, mask=k + ks < K, other=0.0)
            ahead = k + BLOCK_K + ks[None, :]  # the next slice, loading while this one is summed
            w_next = tl.load(w_ptrs + k + BLOCK_K, mask=col_ok & (ahead < K), other=0.0)
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
            w = w_next
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()  # the next kernel may start (it waits for y)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + cols, acc.to(y_ptr.dtype.element_ty), mask=cols < N)


class TritonGemv:
    """`gemv(x, weight, bias)` with F.linear's contract: one row of x in half precision goes
    through the Triton kernel, anything else to F.linear. With `pdl` (Hopper and later) every
    launch is a programmatic dependent launch."""

    BLOCK_N = 4  # output columns per program
    BLOCK_K = 1024  # weight columns per slice
    NUM_WARPS = 2

    def __init__(self, pdl: bool) -> None:
        require_triton()
        self.pdl = pdl

    def takes(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (
            x.is_cuda
            and x.dim() == 2
            and x.shape[0] == 1
            and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype
            and x.stride(1) == 1
            and weight.stride(1) == 1
        )

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self.takes(x, weight):
            return F.linear(x, weight, bias)
        n, k = weight.shape
        y = torch.empty(1, n, dtype=x.dtype, device=x.device)
        _gemv_kernel[(triton.cdiv(n, self.BLOCK_N),)](
            x,
            weight,
            bias if bias is not None else weight,  # not read without a bias
            y,
            n,
            k,
            weight.stride(0),
            HAS_BIAS=bias is not None,
            BLOCK_N=self.BLOCK_N,
            BLOCK_K=self.BLOCK_K,
            PDL=self.pdl,
            num_warps=self.NUM_WARPS,
            launch_pdl=self.pdl,
        )
        return y


def make_gemv(device: torch.device):
    """Triton's kernel on CUDA (launched as a programmatic dependent on Hopper and later),
    built and checked against F.linear once here; else None (linear layers keep F.linear),
    with the reason logged."""
    if device.type != "cuda":
        return None

    def build() -> TritonGemv:
        gemv = TritonGemv(pdl=torch.cuda.get_device_capability(device)[0] >= 9)
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(1, 3000, generator=gen, device=device, dtype=torch.bfloat16)
        w = torch.randn(77, 3000, generator=gen, device=device, dtype=torch.bfloat16)
        b = torch.randn(77, generator=gen, device=device, dtype=torch.bfloat16)
        got, want = gemv(x, w, b).float(), F.linear(x.float(), w.float(), b.float())
        if not torch.allclose(got, want, rtol=1e-2, atol=0.5):  # bf16 outputs of magnitude ~50
            raise RuntimeError("its results are wrong")
        return gemv

    return built_or_fallback(build, None, "one-row linear layers run cuBLAS, not Triton's GEMV,")
