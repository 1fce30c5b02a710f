"""Building blocks shared by the model files.

Numerics follow the HF reference op for op (same dtype casts, same order of operations), so
float32 vlmd outputs match transformers to rounding and greedy decoding agrees token for token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm with the variance taken in float32 and the weight applied after casting back."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        variance = x32.pow(2).mean(-1, keepdim=True)
        # Casting back before the weight multiply (not after) is what HF does in bf16.
        return self.weight * (x32 * torch.rsqrt(variance + self.eps)).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary position embedding (rotate_half over cat(freqs, freqs)).

    cos/sin are computed from the positions of each step in float32 rather than looked up in a
    table: this is exactly the arithmetic HF does, so the two agree bit for bit, and a step's
    cost (T x head_dim/2 products) is negligible next to attention.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        # Built on the CPU explicitly so a model constructed under a meta device still gets a
        # real buffer; `module.to(device)` moves it, and it stays float32 whatever the weights are.
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim
        self.register_buffer("inv_freq", 1.0 / (theta**exponents), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T]; q: [T, num_q_heads, head_dim]; k: [T, num_kv_heads, head_dim]."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [T, head_dim / 2]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, head_dim]
        cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): the LLaMA/Qwen feed-forward block."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def make_norm(norm_type: str, hidden_size: int, eps: float) -> nn.Module:
    """The vision tower's norm: InternViT-300M uses LayerNorm, InternViT-6B RMSNorm."""
    if norm_type == "layer_norm":
        return nn.LayerNorm(hidden_size, eps=eps)
    if norm_type == "rms_norm":
        return RMSNorm(hidden_size, eps=eps)
    raise ValueError(f"unknown norm_type {norm_type!r}")
