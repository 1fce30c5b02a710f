"""Residual add + LayerNorm in one pass over the rows, for InternViT on CUDA in half precision.

Between two of InternViT's branches the residual stream takes `x + branch` and the next branch
reads `layer_norm(x + branch)`. torch runs that as two kernels and four passes over the rows (an
add at full bandwidth: 1.10 ms of a 12-tile InternViT-300M forward on an H100; its LayerNorm
at about half of it: 1.68 ms). `add_layer_norm` reads x and the branch once and writes the sum
and the normalised rows once, with torch's arithmetic: the sum rounded to the rows' dtype, the
statistics and the affine step in float32 from that rounded sum, one rounding at the end.

`TorchAddLayerNorm` is the same contract op by op (the CPU, and every dtype the kernel does not
take); `make_add_layer_norm` picks one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmd.kernels.probe import built_or_fallback, require_triton, tl, triton


class TorchAddLayerNorm:
    def __call__(
        self, x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, branch: [..., hidden] -> (x + branch, layer_norm(x + branch)), both [..., hidden]."""
        total = x + branch
        return total, F.layer_norm(total, total.shape[-1:], weight, bias, eps)


TORCH_ADD_LAYER_NORM = TorchAddLayerNorm()


if triton is not None:  # the CUDA path only; a CPU install has no Triton

    @triton.jit
    def _add_layer_norm_kernel(
        x_ptr, branch_ptr, weight_ptr, bias_ptr, total_ptr, out_ptr, n_cols, eps, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64) * n_cols
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row + cols, mask=mask, other=0.0)
        branch = tl.load(branch_ptr + row + cols, mask=mask, other=0.0)
        total = (x.to(tl.float32) + branch.to(tl.float32)).to(x.dtype)  # rounded as torch's add
        tl.store(total_ptr + row + cols, total, mask=mask)
        t = total.to(tl.float32)
        mean = tl.sum(t, axis=0) / n_cols
        centred = tl.where(mask, t - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / n_cols + eps)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row + cols, (centred * rstd * w + b).to(x.dtype), mask=mask)


class TritonAddLayerNorm:
    """One Triton program per row (rows up to `MAX_WIDTH` wide, contiguous, fp16/bf16)."""

    MAX_WIDTH = 8192

    def __init__(self) -> None:
        require_triton()

    def __call__(
        self, x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        width = x.shape[-1]
        if (
            x.dtype not in (torch.float16, torch.bfloat16)
            or branch.dtype != x.dtype
            or width > self.MAX_WIDTH
            or not (x.is_contiguous() and branch.is_contiguous())
        ):
            return TORCH_ADD_LAYER_NORM(x, branch, weight, bias, eps)
        total, out = torch.empty_like(x), torch.empty_like(x)
        block = triton.next_power_of_2(width)
        rows = x.numel() // width
        warps = min(max(block // 256, 1), 16)  # 8 elements per thread per pass
        _add_layer_norm_kernel[(rows,)](
            x, branch, weight, bias, total, out, width, eps, BLOCK=block, num_warps=warps
        )
        return total, out


def make_add_layer_norm(device: torch.device, dtype: torch.dtype, width: int):
    """Triton's fused kernel on CUDA, built and run once here for rows of `width` in `dtype` (so a
    GPU or an install it cannot build for falls back at load, not mid-request); else torch op by
    op, with the reason logged."""
    if device.type != "cuda":
        return TORCH_ADD_LAYER_NORM

    def build() -> TritonAddLayerNorm:
        fused = TritonAddLayerNorm()
        rows = torch.ones(2, width, device=device, dtype=dtype)
        total, _ = fused(rows, rows, rows[0], rows[0], 1e-6)
        if not bool((total == 2).all()):
            raise RuntimeError("its sums are wrong")
        return fused

    return built_or_fallback(
        build, TORCH_ADD_LAYER_NORM, "residual add + LayerNorm runs (Triton's kernel failed)"
    )
