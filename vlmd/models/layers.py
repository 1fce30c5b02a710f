"""Building blocks shared by the model files.

With `TorchOps` the numerics follow the HF reference op for op (same dtype casts, same order of
operations), so float32 vlmd outputs match transformers to rounding and greedy decoding agrees
token for token. The row-wise ops run through `self.ops`, set once for the whole model.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmd.kernels.ops import TorchOps

TORCH_OPS = TorchOps()


class RMSNorm(nn.Module):
    """RMSNorm with the variance taken in float32 and the weight applied after casting back."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.ops = TORCH_OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add fused into the norm."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary position embedding (rotate_half over cat(freqs, freqs)).

    cos/sin are computed from the positions of each step in float32 rather than looked up in a
    table: this is exactly the arithmetic HF does, so the two agree bit for bit, and a step's
    cost (T x head_dim/2 products) is negligible next to attention.

    LongRoPE (`factors`, within the original context): each frequency divided by its factor, and
    cos/sin multiplied by `scaling`, as transformers computes them.
    """

    def __init__(
        self, head_dim: int, theta: float, factors: tuple[float, ...] | None = None, scaling: float = 1.0
    ) -> None:
        super().__init__()
        self.theta = theta
        self.plain = factors is None and scaling == 1.0  # what a fused kernel from theta alone gives
        self.scaling = scaling
        self.ops = TORCH_OPS
        # Built on the CPU explicitly so a model constructed under a meta device still gets a
        # real buffer; `module.to(device)` moves it, and it stays float32 whatever the weights are.
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim
        divisors = 1.0 if factors is None else torch.tensor(factors, dtype=torch.float32, device="cpu")
        self.register_buffer("inv_freq", 1.0 / (divisors * theta**exponents), persistent=False)

    def prepare(self, positions: torch.Tensor) -> torch.Tensor:
        """A step's positions as every layer's `forward` takes them (converted once per step)."""
        return self.ops.rope_positions(positions)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T]; q: [T, num_q_heads, head_dim]; k: [T, num_kv_heads, head_dim]."""
        if not self.plain:
            return self.ops.scaled_rope(q, k, positions, self.inv_freq, self.scaling)
        return self.ops.rope(q, k, positions, self.inv_freq, self.theta)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): the LLaMA/Qwen feed-forward block.

    Loads as HF's gate_proj / up_proj; `fuse()` (the loader calls it) makes them one GEMM.
    """

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.ops = TORCH_OPS

    def fuse(self) -> None:
        self.gate_up_proj = fuse_linears(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))  # [T, I] between the two


def fuse_linears(*linears: nn.Linear) -> nn.Linear:
    """One Linear whose output is the outputs of `linears` side by side (one GEMM instead of many)."""
    first = linears[0]
    # On the meta device: a Linear made on the CPU fills a float32 weight of the fused size with
    # random values first (24 s of a 35 s load of the InternVL3-8B shape on an H200), all dropped.
    out_features = sum(m.out_features for m in linears)
    fused = nn.Linear(first.in_features, out_features, bias=first.bias is not None, device="meta")
    fused.weight = nn.Parameter(torch.cat([m.weight.data for m in linears]), requires_grad=False)
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([m.bias.data for m in linears]), requires_grad=False)
    return fused


def set_ops(model: nn.Module, ops: TorchOps) -> None:
    """Point every layer of `model` that has row-wise ops at `ops`, and its linear layers at
    `ops.gemv` where the ops have one."""
    for module in model.modules():
        if hasattr(module, "ops"):
            module.ops = ops
        elif isinstance(module, nn.Linear):
            # An instance attribute: nn.Module's __call__ runs it, and the tensor-parallel hooks
            # after it; without a gemv the class's F.linear forward is back.
            vars(module).pop("forward", None)
            if ops.gemv is not None:
                module.forward = lambda x, m=module, gemv=ops.gemv: gemv(x, m.weight, m.bias)


def make_norm(norm_type: str, hidden_size: int, eps: float) -> nn.Module:
    """The vision tower's norm: InternViT-300M uses LayerNorm, InternViT-6B RMSNorm."""
    if norm_type == "layer_norm":
        return nn.LayerNorm(hidden_size, eps=eps)
    if norm_type == "rms_norm":
        return RMSNorm(hidden_size, eps=eps)
    raise ValueError(f"unknown norm_type {norm_type!r}")
