"""Row-wise ops of a decoder layer (norms, rotary, gated activation), chosen once at start-up.

`TorchOps` repeats transformers' arithmetic op for op (the CPU path and the float32 oracle);
`FlashInferOps` runs each as one fused CUDA kernel. Model files call `self.ops.<op>` and never
ask which one they hold.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from vlmd.kernels.gemv import make_gemv


class TorchOps:
    """transformers' arithmetic: variance in float32, weight applied after casting back."""

    name = "torch"
    # One-row linear layers: `gemv(x, weight, bias)` in place of nn.Linear's F.linear (None: keep it).
    gemv = None

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        variance = x32.pow(2).mean(-1, keepdim=True)
        return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); either input's memory may be reused."""
        residual = x + residual
        return self.rms_norm(residual, weight, eps), residual

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2 * I] (gate then up) -> [T, I]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rope_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """A step's positions in the form `rope` takes, converted once for all layers."""
        return positions

    def rope(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, theta: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Neox-style rotary; q: [T, q_heads, head_dim], k: [T, kv_heads, head_dim], either may be
        a strided view (of a fused q/k/v output)."""
        return self.scaled_rope(q, k, positions, inv_freq, 1.0)

    def scaled_rope(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        positions: torch.Tensor,
        inv_freq: torch.Tensor,
        scaling: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`rope` from any per-frequency `inv_freq`, with cos and sin multiplied by `scaling` in
        float32 (LongRoPE's attention factor). Every kind of ops runs this one op by op: a fused
        kernel that derives the frequencies from theta cannot."""
        freqs = positions[:, None].float() * inv_freq[None, :]  # [T, head_dim / 2]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, head_dim]
        cos, sin = angles.cos(), angles.sin()
        if scaling != 1.0:
            cos, sin = cos * scaling, sin * scaling
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class FlashInferOps(TorchOps):
    """One fused FlashInfer kernel per op (CUDA, float16/bfloat16)."""

    name = "flashinfer"

    def __init__(self) -> None:
        import flashinfer

        self._fi = flashinfer

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self._fi.norm.rmsnorm(x.contiguous(), weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # In place: residual += x, then x = norm(residual). Both are the layer's own temporaries.
        x, residual = x.contiguous(), residual.contiguous()
        self._fi.norm.fused_add_rmsnorm(x, residual, weight, eps)
        return x, residual

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._fi.activation.silu_and_mul(gate_up.contiguous())

    def rope_positions(self, positions: torch.Tensor) -> torch.Tensor:
        return positions.to(torch.int32)

    def rope(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, theta: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The kernel reads q/k through their row and head strides and writes new contiguous
        # tensors: the views of the q/k/v GEMM output need no copy first (at batch 64 the two
        # copies per layer cost 0.2 ms a step). `.to` is free once `rope_positions` converted.
        return self._fi.rope.apply_rope_pos_ids(
            last_dim_contiguous(q), last_dim_contiguous(k), positions.to(torch.int32), rope_theta=theta
        )


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """FlashInfer takes row/head strides but needs unit stride along head_dim."""
    return x if x.stride(-1) == 1 else x.contiguous()


def make_ops(
    device: torch.device, dtype: torch.dtype, logger: logging.Logger | None = None, gemv: bool = True
) -> TorchOps:
    """FlashInfer's fused kernels on CUDA in half precision when importable, else torch; with
    `gemv`, one-row linear layers on CUDA run Triton's GEMV (vlmd.kernels.gemv)."""
    log = logger or logging.getLogger("vlmd.kernels")
    if torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        try:
            ops = FlashInferOps()
        except ImportError as exc:
            log.warning("decoder ops: torch (flashinfer not importable: %s)", exc)
            return TorchOps()
        if gemv:
            ops.gemv = make_gemv(torch.device(device))
        log.info(
            "decoder ops: FlashInfer (rmsnorm, fused add-rmsnorm, rope, silu_and_mul); one-row linears: %s",
            "cuBLAS" if ops.gemv is None else "Triton GEMV",
        )
        return ops
    return TorchOps()
