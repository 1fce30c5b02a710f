"""Greedy tokens and their log-probabilities from a decode step's logits, in one pass over them.

Sampling needs, per row of logits, the most likely token (the greedy choice) and the row's
log-sum-exp (every reported logprob is logit - logsumexp). torch gets them from an argmax and a
log_softmax over the whole [rows, vocab] float32 matrix: its softmax kernel gives each row one
CTA (one CTA streams 600 KB of a 151k vocabulary: 32 us at batch 1 on an H100, 69 us at batch 64)
and writes the full matrix back. `RowStats` splits every row into chunks (one Triton program
each: chunk max, first argmax, sum of exp(x - max)), and a second small kernel combines the
chunks of each row, the way FlashInfer merges split-KV attention states: the argmax, the
log-sum-exp and the argmax's logprob. Nothing is written but those three numbers per row.

`torch_row_stats` is the same contract op by op (the CPU, and what the kernel does not take);
`make_row_stats` picks one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vlmd.kernels.probe import built_or_fallback, require_triton, tl, triton


class RowStats(NamedTuple):
    argmax: torch.Tensor  # [rows] int64: the first index of each row's largest logit
    logsumexp: torch.Tensor  # [rows] float32
    best_logprob: torch.Tensor  # [rows] float32: the argmax's logprob (its logit - logsumexp)


def torch_row_stats(logits: torch.Tensor) -> RowStats:
    """logits: [rows, vocab] float32."""
    logsumexp = torch.logsumexp(logits, dim=-1)
    best, argmax = logits.max(dim=-1)
    return RowStats(argmax, logsumexp, best - logsumexp)


if triton is not None:  # the CUDA path only; a CPU install has no Triton

    @triton.jit
    def _chunk_stats_kernel(logits_ptr, row_stride, vocab, max_ptr, arg_ptr, sum_ptr, BLOCK: tl.constexpr):
        row, chunk = tl.program_id(0), tl.program_id(1)
        cols = chunk * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + row.to(tl.int64) * row_stride + cols, mask=cols < vocab, other=float("-inf"))
        best = tl.max(x, axis=0)
        # A chunk of -inf only (masked logits) adds nothing to the row's sum.
        total = tl.where(best == float("-inf"), 0.0, tl.sum(tl.exp(x - best), axis=0))
        out = row * tl.num_programs(1) + chunk
        tl.store(max_ptr + out, best)
        tl.store(arg_ptr + out, chunk * BLOCK + tl.argmax(x, axis=0, tie_break_left=True))
        tl.store(sum_ptr + out, total)

    @triton.jit
    def _combine_kernel(
        max_ptr, arg_ptr, sum_ptr, num_chunks, argmax_ptr, lse_ptr, best_ptr, CHUNKS: tl.constexpr
    ):
        row = tl.program_id(0)
        chunks = tl.arange(0, CHUNKS)
        mask = chunks < num_chunks
        maxes = tl.load(max_ptr + row * num_chunks + chunks, mask=mask, other=float("-inf"))
        sums = tl.load(sum_ptr + row * num_chunks + chunks, mask=mask, other=0.0)
        best = tl.max(maxes, axis=0)
        first = tl.argmax(maxes, axis=0, tie_break_left=True)  # chunks in index order: the first
        lse = best + tl.log(tl.sum(tl.where(sums > 0, sums * tl.exp(maxes - best), 0.0), axis=0))
        tl.store(argmax_ptr + row, tl.load(arg_ptr + row * num_chunks + first).to(tl.int64))
        tl.store(lse_ptr + row, lse)
        tl.store(best_ptr + row, best - lse)


class TritonRowStats:
    """Two Triton kernels over float32 logits whose rows are contiguous."""

    BLOCK = 4096  # logits per program: 16 KB of float32

    def __init__(self) -> None:
        require_triton()

    def __call__(self, logits: torch.Tensor) -> RowStats:
        if logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(1) != 1:
            return torch_row_stats(logits)
        rows, vocab = logits.shape
        chunks = triton.cdiv(vocab, self.BLOCK)
        device = logits.device
        maxes = torch.empty(rows, chunks, dtype=torch.float32, device=device)
        args = torch.empty(rows, chunks, dtype=torch.int32, device=device)
        sums = torch.empty(rows, chunks, dtype=torch.float32, device=device)
        _chunk_stats_kernel[(rows, chunks)](
            logits, logits.stride(0), vocab, maxes, args, sums, BLOCK=self.BLOCK, num_warps=8
        )
        argmax = torch.empty(rows, dtype=torch.int64, device=device)
        lse = torch.empty(rows, dtype=torch.float32, device=device)
        best = torch.empty(rows, dtype=torch.float32, device=device)
        _combine_kernel[(rows,)](
            maxes, args, sums, chunks, argmax, lse, best, CHUNKS=triton.next_power_of_2(chunks), num_warps=1
        )
        return RowStats(argmax, lse, best)


def make_row_stats(device: torch.device):
    """Triton's kernels on CUDA, built and run once here (so a GPU or an install they cannot
    build for falls back at load, not mid-request); else torch op by op, with the reason logged."""
    if device.type != "cuda":
        return torch_row_stats

    def build() -> TritonRowStats:
        fused = TritonRowStats()
        probe = torch.zeros(2, 3 * TritonRowStats.BLOCK + 5, device=device)
        probe[0, 7] = probe[1, -1] = 1.0
        got, want = fused(probe), torch_row_stats(probe)
        if got.argmax.tolist() != [7, probe.shape[1] - 1] or not torch.allclose(
            got.logsumexp, want.logsumexp
        ):
            raise RuntimeError("its results are wrong")
        return fused

    return built_or_fallback(
        build, torch_row_stats, "sampling's argmax + logsumexp run (Triton's kernels failed)"
    )
