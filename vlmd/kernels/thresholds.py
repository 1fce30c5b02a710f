"""The smallest logit each row of a sampled batch keeps (top-k, top-p, min-p), from the row's best
logits in descending order (`vlmd.kernels.sampler.keep_thresholds` finds those).

`torch_thresholds` is the contract op by op (the CPU, and the reference of the tests): about 30
small kernels for a batch, whatever its size, each a few microseconds of the GPU's time after
the decode step. `TritonThresholds` does one row per program in one kernel, for up to
`MAX_CANDIDATES` candidates a row (a top-k); more (top-p over a whole sorted vocabulary) goes op
by op. The kept token is the same; a threshold from min-p may differ in its last bit (the
logarithm's rounding).
"""

from __future__ import annotations

import torch

from vlmd.kernels.probe import built_or_fallback, require_triton, tl, triton

MAX_CANDIDATES = 1024


def torch_thresholds(values: torch.Tensor, knobs: torch.Tensor, vocab: int) -> torch.Tensor:
    """values [num_reqs, n] float32: each row's n best logits (penalties applied), largest first;
    knobs [num_reqs, 4] float32: inverse temperature (0: greedy), top-p, min-p, top-k (the
    vocabulary size or more: none). Returns [num_reqs]: -inf for a row that keeps every token.
    Thresholds keep ties: a token whose logit equals the k-th largest is kept, as transformers'
    top-k keeps it."""
    inv_temperature, top_p, min_p, top_k = (column[:, None] for column in knobs.unbind(1))
    in_top_k = torch.arange(values.shape[-1], device=values.device)[None, :] < top_k
    probs = torch.softmax((values * inv_temperature).masked_fill(~in_top_k, float("-inf")), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    keep = in_top_k & ((mass_before < top_p) | (top_p >= 1.0))
    # The best token is always kept: so by construction, since probabilities may be NaN where
    # penalties pushed logits to infinity (a repetition_penalty of 1e-300), and an index of -1
    # below would crash the worker.
    keep[:, 0] = True
    last = keep.sum(dim=-1, keepdim=True) - 1
    thresholds = values.gather(1, last)
    limited = ((top_k < vocab) | (top_p < 1.0)) & (inv_temperature > 0)
    thresholds = torch.where(limited, thresholds, float("-inf"))
    # min-p: probability at least min_p times the best one's, i.e. a logit at least
    # best + T * log(min_p).
    floor = values[:, :1] + torch.log(min_p) / inv_temperature.clamp(min=1e-30)
    floor = torch.where((min_p > 0) & (inv_temperature > 0), floor, float("-inf"))
    return torch.maximum(thresholds, floor)[:, 0]


if triton is not None:  # the CUDA path only; a CPU install has no Triton

    @triton.jit
    def _thresholds_kernel(values_ptr, num_values, knobs_ptr, vocab, out_ptr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        idx = tl.arange(0, BLOCK)
        ok = idx < num_values
        values = tl.load(values_ptr + row * num_values + idx, mask=ok, other=float("-inf"))
        inv_t = tl.load(knobs_ptr + 4 * row)
        top_p = tl.load(knobs_ptr + 4 * row + 1)
        min_p = tl.load(knobs_ptr + 4 * row + 2)
        top_k = tl.load(knobs_ptr + 4 * row + 3)
        # As `torch_thresholds`, step for step (the scalar conditions combined as integers).
        in_top_k = ok & (idx.to(tl.float32) < top_k)
        scaled = tl.where(in_top_k, values * inv_t, float("-inf"))
        shifted = tl.exp(scaled - tl.max(scaled, axis=0))
        probs = shifted / tl.sum(shifted, axis=0)
        mass_before = tl.cumsum(probs, axis=0) - probs
        within_p = ((mass_before < top_p).to(tl.int32) + (top_p >= 1.0).to(tl.int32)) > 0
        keep = (in_top_k & within_p) | (idx == 0)
        last = tl.sum(keep.to(tl.int32), axis=0) - 1
        threshold = tl.sum(tl.where(idx == last, values, 0.0), axis=0)
        sampled = (inv_t > 0).to(tl.int32)
        limited = ((top_k < vocab).to(tl.int32) + (top_p < 1.0).to(tl.int32)) * sampled > 0
        threshold = tl.where(limited, threshold, float("-inf"))
        best = tl.sum(tl.where(idx == 0, values, 0.0), axis=0)
        floor = best + tl.log(min_p) / tl.maximum(inv_t, 1e-30)
        floor = tl.where((min_p > 0).to(tl.int32) * sampled > 0, floor, float("-inf"))
        tl.store(out_ptr + row, tl.maximum(threshold, floor))


class TritonThresholds:
    """One Triton program per row over its candidates (at most MAX_CANDIDATES)."""

    def __init__(self) -> None:
        require_triton()

    def __call__(self, values: torch.Tensor, knobs: torch.Tensor, vocab: int) -> torch.Tensor:
        num_reqs, num_values = values.shape
        if num_values > MAX_CANDIDATES or values.dtype != torch.float32:
            return torch_thresholds(values, knobs, vocab)
        out = torch.empty(num_reqs, dtype=torch.float32, device=values.device)
        _thresholds_kernel[(num_reqs,)](
            values.contiguous(),
            num_values,
            knobs.to(torch.float32).contiguous(),
            vocab,
            out,
            BLOCK=max(16, triton.next_power_of_2(num_values)),
            num_warps=4,
        )
        return out


def make_thresholds(device: torch.device):
    """Triton's kernel on CUDA, built and checked against the torch reference once here (the same
    kept tokens), else torch's ops, with the reason logged; torch on the CPU."""
    if device.type != "cuda":
        return torch_thresholds

    def build() -> TritonThresholds:
        fused = TritonThresholds()
        generator = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(5, 300, device=device, generator=generator) * 3
        values = torch.topk(logits, 50, dim=-1).values
        knobs = torch.tensor(
            [
                [1 / 0.7, 0.9, 0.0, 50.0],  # as most clients sample
                [1.0, 1.0, 0.0, 5.0],  # top-k alone
                [2.0, 0.5, 0.0, 2.0**31],  # top-p alone (over the 50 candidates)
                [1.0, 1.0, 0.1, 2.0**31],  # min-p alone
                [0.0, 0.9, 0.0, 50.0],  # greedy: keeps everything
            ],
            device=device,
        )
        got, want = fused(values, knobs, 300), torch_thresholds(values, knobs, 300)
        if not torch.allclose(got, want, rtol=1e-6, atol=0.0):
            raise RuntimeError(
                f"its thresholds {got.tolist()} differ from the torch reference's {want.tolist()}"
            )
        return fused

    return built_or_fallback(build, torch_thresholds, "sampling's top-k / top-p / min-p thresholds run")
