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


def tile_qkv(num_tiles: int, seed: int, heads: int = 16, head_dim: int = 64, seq: int = 1025):
    """q, k, v [tiles, seq, heads, head_dim] as InternViT-300M slices them out of its fused
    projection (strided views), bf16; q scaled so that each query's softmax is peaked (logits of
    standard deviation 3), not a near-uniform average that a wrong key or scale would hardly move."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    width = heads * head_dim
    qkv = torch.randn(num_tiles, seq, 3 * width, device="cuda", generator=gen)
    qkv[..., :width] *= 3
    qkv = qkv.bfloat16()
    return [t.view(num_tiles, seq, heads, head_dim) for t in qkv.split(width, dim=-1)]


@pytest.mark.parametrize("num_tiles", [1, 3, 13, 40])  # 40: past the per-count planned wrappers
def test_flashinfer_tile_attention_matches_sdpa(num_tiles: int):
    from vlmd.kernels.vision_attention import SDPA_TILE_ATTENTION, FlashInferTileAttention

    q, k, v = tile_qkv(num_tiles, seed=num_tiles)
    scale = 64**-0.5
    ours = FlashInferTileAttention(torch.device("cuda"))(q, k, v, scale)
    assert ours.shape == q.shape
    ref = SDPA_TILE_ATTENTION(q.float(), k.float(), v.float(), scale)
    sdpa_bf16 = SDPA_TILE_ATTENTION(q, k, v, scale)
    # Both round the softmax probabilities to bf16 before P @ V; a few outliers may land a unit
    # apart, so the maximum gets twice torch's, the mean the usual ratio.
    assert max_error(ours, ref) <= 2 * max_error(sdpa_bf16, ref)
    assert (ours.float() - ref).abs().mean() <= ERROR_RATIO * (sdpa_bf16.float() - ref).abs().mean()
    # Tiles never mix: changing one tile's keys leaves the other tiles' outputs as they were.
    if num_tiles > 1:
        k2 = k.clone()
        k2[0] = -k2[0]
        again = FlashInferTileAttention(torch.device("cuda"))(q, k2, v, scale)
        assert torch.equal(again[1:], ours[1:]) and not torch.equal(again[0], ours[0])


def test_flashinfer_tile_attention_replays_in_a_cuda_graph():
    """The wrapper planned for a tile count before capture serves every replay of the graph."""
    from vlmd.kernels.vision_attention import FlashInferTileAttention

    attention = FlashInferTileAttention(torch.device("cuda"))
    q, k, v = tile_qkv(4, seed=0)
    static = [t.clone() for t in (q, k, v)]
    attention(*static, 0.125)  # warm-up, plans the wrapper
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention(*static, 0.125)
    for seed in (1, 2):
        fresh = tile_qkv(4, seed=seed)
        for dst, src in zip(static, fresh, strict=True):
            dst.copy_(src)
        graph.replay()
        assert torch.equal(out, attention(*fresh, 0.125))


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((3, 1025, 1024), torch.bfloat16), ((2, 7, 1000), torch.bfloat16), ((5, 1024), torch.float16)],
)
def test_triton_add_layer_norm_matches_torch(shape, dtype):
    """InternViT's residual add + LayerNorm in one Triton kernel against torch's two ops: the sum
    bit for bit, the normalised rows scored against float32 (non-trivial weight and bias; a width
    that is no power of two exercises the masked tail). Graph replay gives eager's rows."""
    from vlmd.kernels.add_norm import TORCH_ADD_LAYER_NORM, TritonAddLayerNorm, make_add_layer_norm

    assert isinstance(make_add_layer_norm(torch.device("cuda"), dtype, shape[-1]), TritonAddLayerNorm)
    fused = TritonAddLayerNorm()
    gen = torch.Generator(device="cuda").manual_seed(shape[-1])
    width = shape[-1]
    x = (3 * torch.randn(shape, device="cuda", generator=gen) + 1).to(dtype)
    branch = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    weight = (1 + 0.2 * torch.randn(width, device="cuda", generator=gen)).to(dtype)
    bias = (0.2 * torch.randn(width, device="cuda", generator=gen)).to(dtype)

    total, out = fused(x, branch, weight, bias, 1e-6)
    expected_total, expected = TORCH_ADD_LAYER_NORM(x, branch, weight, bias, 1e-6)
    assert torch.equal(total, expected_total)
    ref = torch.nn.functional.layer_norm(total.float(), (width,), weight.float(), bias.float(), 1e-6)
    assert out.shape == x.shape and out.dtype == dtype
    assert max_error(out, ref) <= ERROR_RATIO * max_error(expected, ref) + 1e-6

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_total, graph_out = fused(x, branch, weight, bias, 1e-6)
    x.copy_(torch.randn(shape, device="cuda", generator=gen).to(dtype))
    graph.replay()
    eager_total, eager_out = fused(x, branch, weight, bias, 1e-6)
    assert torch.equal(graph_total, eager_total) and torch.equal(graph_out, eager_out)


@pytest.mark.parametrize(
    "n, k, bias",
    [(4608, 3584, True), (3584, 1792, False), (75840, 3584, False), (77, 3000, True), (5, 1000, False)],
)
def test_triton_gemv_matches_cublas(n: int, k: int, bias: bool):
    """One row times a weight matrix: the Triton GEMV's error against float32 is of the order of
    cuBLAS's own (both sum in float32 and round once); sizes that are no multiple of the
    blocks (N = 77, 5; K = 3000, 1000) are masked, not read out of bounds."""
    import torch.nn.functional as F

    from vlmd.kernels.gemv import make_gemv

    gemv = make_gemv(torch.device("cuda"))
    assert gemv is not None, "the Triton GEMV did not build"
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(1, k, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).bfloat16()
    b = torch.randn(n, device="cuda", generator=gen).bfloat16() if bias else None
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    got, cublas = gemv(x, w, b), F.linear(x, w, b)
    assert got.shape == (1, n) and got.dtype == torch.bfloat16
    assert max_error(got, ref) <= ERROR_RATIO * max_error(cublas, ref) + 1e-3
    # More than one row goes to F.linear, bit for bit.
    x2 = torch.randn(3, k, device="cuda", generator=gen).bfloat16()
    assert torch.equal(gemv(x2, w, b), F.linear(x2, w, b))


def test_triton_gemv_chain_replays_in_a_cuda_graph():
    """Back-to-back programmatic dependent launches inside a CUDA graph: each GEMV reads its
    weights before the one before it has finished, but its input only after; a chain of them
    (each output the next input, as in a layer) replays to the eager result."""
    from vlmd.kernels.gemv import make_gemv

    gemv = make_gemv(torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    ws = [(torch.randn(2048, 2048, device="cuda", generator=gen) / 2048**0.5).bfloat16() for _ in range(8)]
    x = torch.randn(1, 2048, device="cuda", generator=gen).bfloat16()

    def chain(v: torch.Tensor) -> torch.Tensor:
        for w in ws:
            v = gemv(v, w)
        return v

    want = chain(x)
    static_x = x.clone()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        chain(static_x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(static_x)
    for scale in (1.0, -0.5):
        static_x.copy_(x * scale)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, chain(x * scale))
    assert torch.equal(chain(x), want)
