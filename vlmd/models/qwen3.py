"""Qwen3 (InternVL3.5's dense sizes): Llama's decoder with an RMSNorm over each head of q and of
k between the projection and rotary (one weight of head_dim channels shared by the heads), and
no biases."""

from __future__ import annotations

import torch

from vlmd.models.config import InternVLArch
from vlmd.models.decoder import CausalLM, DecoderAttention
from vlmd.models.layers import RMSNorm


class Qwen3Attention(DecoderAttention):
    def __init__(self, arch: InternVLArch, layer_idx: int) -> None:
        super().__init__(arch, layer_idx)
        self.q_norm = RMSNorm(self.head_dim, arch.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, arch.rms_norm_eps)

    def norm_heads(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _per_head(self.q_norm, q), _per_head(self.k_norm, k)


def _per_head(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """[T, heads, head_dim] (a strided view of the q/k/v output) -> the same shape, normalised."""
    rows = x.reshape(-1, x.shape[-1])  # [T * heads, head_dim]: one copy, rows the kernels take
    return norm(rows).view(x.shape)


class Qwen3ForCausalLM(CausalLM):
    attention = Qwen3Attention
