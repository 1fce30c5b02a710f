"""FlashInfer's fused decoder ops against transformers' arithmetic (`TorchOps`), on the GPU.

Both run in bfloat16 and are scored against the same ops in float32: FlashInfer rounds once
where torch rounds after every op, so it may be closer to float32 but must never be much
further. The inputs are laid out as the model hands them over: q and k as strided views of one
fused q/k/v GEMM output, positions converted once per step by `rope_positions`.
"""

from __future__ import annotations

import pytest
import torch

from vlmd.kernels.ops import TorchOps

pytestmark = pytest.mark.gpu
pytest.importorskip("flashinfer")

# Qwen2-7B's attention shape: 28 query heads, 4 KV heads of 128.
Q_HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 28, 4, 128, 3584
THETA = 1_000_000.0
# FlashInfer's error against float32 may exceed torch's bf16 error by this factor at most: both
# are a few bf16 rounding steps (2^-8 relative each); a wrong stride, position or head reads
# O(1) garbage and fails by orders of magnitude.
ERROR_RATIO = 1.5


def flashinfer_ops():
    from vlmd.kernels.ops import FlashInferOps

    return FlashInferOps()


def max_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.float() - ref.float()).abs().max().item()


def qkv_views(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k as the attention layer slices them out of its fused projection output."""
    q, k, _ = qkv.split([Q_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
    n = qkv.shape[0]
    return q.view(n, Q_HEADS, HEAD_DIM), k.view(n, KV_HEADS, HEAD_DIM)


@pytest.mark.parametrize("num_tokens", [1, 7, 64])
def test_rope_on_strided_views_matches_torch(num_tokens: int):
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    qkv = torch.randn(
        num_tokens, (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, device="cuda", generator=gen
    ).bfloat16()
    positions = torch.randint(0, 8192, (num_tokens,), device="cuda", generator=gen)
    inv_freq = 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM)
    torch_ops, fi_ops = TorchOps(), flashinfer_ops()

    q, k = qkv_views(qkv)
    if num_tokens > 1:
        assert not q.is_contiguous() and not k.is_contiguous()  # the case the kernel must handle
    fi_q, fi_k = fi_ops.rope(q, k, fi_ops.rope_positions(positions), inv_freq, THETA)
    # The strided views give exactly what contiguous copies give.
    fi_q2, fi_k2 = fi_ops.rope(q.contiguous(), k.contiguous(), positions, inv_freq, THETA)
    assert torch.equal(fi_q, fi_q2) and torch.equal(fi_k, fi_k2)
    # The views were read, not written.
    assert torch.equal(qkv_views(qkv)[0], q)

    ref_q, ref_k = torch_ops.rope(q.float(), k.float(), positions, inv_freq, THETA)
    bf_q, bf_k = torch_ops.rope(q, k, positions, inv_freq, THETA)
    assert max_error(fi_q, ref_q) <= ERROR_RATIO * max_error(bf_q, ref_q) + 1e-6
    assert max_error(fi_k, ref_k) <= ERROR_RATIO * max_error(bf_k, ref_k) + 1e-6


@pytest.mark.parametrize("num_tokens", [1, 64])
def test_norms_and_activation_match_torch(num_tokens: int):
    gen = torch.Generator(device="cuda").manual_seed(100 + num_tokens)
    x = torch.randn(num_tokens, HIDDEN, device="cuda", generator=gen).bfloat16()
    residual = torch.randn(num_tokens, HIDDEN, device="cuda", generator=gen).bfloat16()
    weight = (1 + 0.1 * torch.randn(HIDDEN, device="cuda", generator=gen)).bfloat16()
    gate_up = torch.randn(num_tokens, 2 * 4736, device="cuda", generator=gen).bfloat16()
    torch_ops, fi_ops = TorchOps(), flashinfer_ops()

    ref = torch_ops.rms_norm(x.float(), weight.float(), 1e-6)
    assert (
        max_error(fi_ops.rms_norm(x, weight, 1e-6), ref)
        <= ERROR_RATIO * max_error(torch_ops.rms_norm(x, weight, 1e-6), ref) + 1e-6
    )

    ref_norm, ref_sum = torch_ops.add_rms_norm(x.float(), residual.float(), weight.float(), 1e-6)
    bf_norm, bf_sum = torch_ops.add_rms_norm(x, residual, weight, 1e-6)
    fi_norm, fi_sum = fi_ops.add_rms_norm(x.clone(), residual.clone(), weight, 1e-6)
    assert torch.equal(fi_sum, bf_sum)  # one bf16 rounding of the same sum
    assert max_error(fi_norm, ref_norm) <= ERROR_RATIO * max_error(bf_norm, ref_norm) + 1e-6

    ref = torch_ops.silu_and_mul(gate_up.float())
    assert (
        max_error(fi_ops.silu_and_mul(gate_up), ref)
        <= ERROR_RATIO * max_error(torch_ops.silu_and_mul(gate_up), ref) + 1e-6
    )


def test_vit_mlp_gelu_in_the_gemm_epilogue_matches_torch():
    """InternViT-300M's MLP on CUDA in bf16 (GELU in fc1's cuBLASLt epilogue, tanh form) against
    the same weights in float32 with the exact GELU, next to transformers' bf16 arithmetic."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from vlmd.models.internvl import VisionMLP

    torch.manual_seed(0)
    mlp = VisionMLP(SimpleNamespace(vision_hidden_size=1024, vision_intermediate_size=4096)).cuda()
    x = torch.randn(2, 1025, 1024, device="cuda")
    ref = mlp(x)  # float32: the exact GELU
    mlp = mlp.bfloat16()
    xb = x.bfloat16()
    ours = mlp(xb)
    transformers_bf16 = mlp.fc2(F.gelu(mlp.fc1(xb)))
    assert ours.shape == ref.shape
    assert max_error(ours, ref) <= ERROR_RATIO * max_error(transformers_bf16, ref)
    # The half-precision branch ran (its tanh GELU differs from the exact one somewhere); that
    # the GELU kernel is gone from the forward is for gpu_bench's ViT profile to show.
    assert not torch.equal(ours, transformers_bf16)
