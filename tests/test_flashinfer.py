"""FlashInferBackend against the torch reference on random paged layouts (needs a GPU and flashinfer).

Both backends get the same cache history and the same q/k/v; outputs and the cache slots each
step writes are compared. First run JIT-compiles FlashInfer's kernels: set
FLASHINFER_WORKSPACE_BASE to a kept folder so later runs reuse them.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.test_attention import (
    make_layout,
    random_page_tables,
    read_tokens,
    step_lengths,
    write_tokens,
)
from vlmd.kernels.attention import AttentionBackend, BatchLayout, KVCacheSpec, TorchReferenceBackend
from vlmd.kernels.flashinfer_backend import FlashInferBackend

pytestmark = pytest.mark.gpu
pytest.importorskip("flashinfer")

PAGE_SIZE = 16
NUM_LAYERS = 2
# Each (dtype, head_dim) pair JIT-compiles its own prefill and decode kernels on first use
# (~100 s on an H100), so float16 is checked at one head dim only.
DTYPE_HEAD_DIMS = [(torch.bfloat16, 128), (torch.bfloat16, 64), (torch.float16, 128)]
HEADS = [(8, 8), (16, 4), (28, 4)]  # GQA groups 1, 4, 7 (28/4 is Qwen2.5-7B's, tensor-core decode)
BATCH_SIZES = [1, 3, 16]
# Both backends read the same half-precision cache. The reference computes in float32 and rounds
# its output once; FlashInfer also rounds the softmax probabilities to the input dtype before the
# P @ V product. Each rounding is a relative error of at most 2^-8 for bfloat16 (2^-11 for
# float16), and the two outputs may land one unit in the last place apart (<0.8% / <0.1%
# relative). Outputs are O(1) (softmax averages of unit-normal values), so 2e-2 (bf16) and 1e-2
# (fp16) absolute and relative leave a margin of several units, while a wrong page, a causal
# offset of one token or a missing append moves short-sequence rows by far more.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 1e-2}


def make_backends(
    dtype: torch.dtype, head_dim: int, num_q_heads: int, num_kv_heads: int, num_pages: int, **kwargs
) -> tuple[TorchReferenceBackend, FlashInferBackend]:
    spec = KVCacheSpec(NUM_LAYERS, num_pages, PAGE_SIZE, num_kv_heads, head_dim, dtype, torch.device("cuda"))
    scale = head_dim**-0.5
    return TorchReferenceBackend(spec, num_q_heads, scale), FlashInferBackend(
        spec, num_q_heads, scale, **kwargs
    )


def write_same_history(backends: list[AttentionBackend], tables: list[list[int]], starts: list[int]) -> None:
    """The tokens cached before this step: identical random k/v in every backend's cache."""
    spec = backends[0].spec
    for layer in range(NUM_LAYERS):
        for table, start in zip(tables, starts, strict=True):
            k, v = torch.randn(2, start, spec.num_kv_heads, spec.head_dim, device="cuda", dtype=spec.dtype)
            for backend in backends:
                write_tokens(backend.kv_cache[layer], table, 0, k, v)


def run_step_and_compare(
    ref: TorchReferenceBackend,
    fi: FlashInferBackend,
    layout: BatchLayout,
    starts: list[int],
    qkv_views: bool = False,
) -> None:
    """Plan both backends, run every layer on the same q/k/v and compare outputs and the slots
    this step wrote. qkv_views: pass q/k/v as strided views of one fused projection output."""
    spec = ref.spec
    num_q_heads, num_kv_heads, head_dim = ref.num_q_heads, spec.num_kv_heads, spec.head_dim
    tol = TOLERANCE[spec.dtype]
    ref.plan(layout)
    fi.plan(layout)
    for layer in range(NUM_LAYERS):
        heads = num_q_heads + 2 * num_kv_heads
        qkv = torch.randn(layout.num_tokens, heads, head_dim, device="cuda", dtype=spec.dtype)
        q, k, v = qkv.split([num_q_heads, num_kv_heads, num_kv_heads], dim=1)  # strided views
        if not qkv_views:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        expected = ref.forward(layer, q, k, v)
        out = fi.forward(layer, q, k, v)  # [num_tokens, q_heads, head_dim]
        assert out.shape == expected.shape and out.dtype == spec.dtype
        assert torch.isfinite(out).all()
        torch.testing.assert_close(
            out, expected, atol=tol, rtol=tol, msg=lambda m, layer=layer: f"layer {layer}: {m}"
        )
        for i, (start, kv_len) in enumerate(zip(starts, layout.kv_lens, strict=True)):
            table = layout.pages_of(i, PAGE_SIZE)
            written = read_tokens(fi.kv_cache[layer], table, start, kv_len)
            assert torch.equal(written, read_tokens(ref.kv_cache[layer], table, start, kv_len))


@pytest.mark.parametrize("kind", ["prefill", "decode", "mixed"])
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", HEADS)
@pytest.mark.parametrize("dtype,head_dim", DTYPE_HEAD_DIMS)
def test_one_step_matches_reference(
    dtype: torch.dtype, head_dim: int, num_q_heads: int, num_kv_heads: int, batch_size: int, kind: str
):
    """(a) pure prefill, (b) pure decode, (c) chunks of many tokens mixed with single tokens, all
    over cached history in scattered pages."""
    rng = random.Random(f"{kind}/{batch_size}/{num_q_heads}/{head_dim}/{dtype}")
    torch.manual_seed(rng.randrange(2**31))
    starts, num_new = step_lengths(rng, kind, batch_size, PAGE_SIZE)
    kv_lens = [s + n for s, n in zip(starts, num_new, strict=True)]
    ref, fi = make_backends(dtype, head_dim, num_q_heads, num_kv_heads, num_pages=8 * batch_size)
    tables = random_page_tables(rng, kv_lens, PAGE_SIZE, ref.spec.num_pages)
    layout = make_layout(starts, num_new, tables, PAGE_SIZE)
    write_same_history([ref, fi], tables, starts)
    run_step_and_compare(ref, fi, layout, starts)
    # Only a step of single tokens takes the decode kernels; anything else the paged prefill.
    assert fi._wrapper is (fi._decode if kind == "decode" else fi._prefill)


@pytest.mark.parametrize("num_q_heads,num_kv_heads", HEADS)
@pytest.mark.parametrize("dtype,head_dim", DTYPE_HEAD_DIMS)
def test_prefill_then_decode_steps_write_the_same_cache(
    dtype: torch.dtype, head_dim: int, num_q_heads: int, num_kv_heads: int
):
    """(d) a prefill step then two decode steps, each backend building on its own cache; at the
    end both caches hold the same k/v at every written slot."""
    rng = random.Random(f"steps/{num_q_heads}/{head_dim}/{dtype}")
    torch.manual_seed(rng.randrange(2**31))
    _, prompt_lens = step_lengths(rng, "prefill", 5, PAGE_SIZE)
    final_lens = [n + 2 for n in prompt_lens]
    ref, fi = make_backends(dtype, head_dim, num_q_heads, num_kv_heads, num_pages=64)
    tables = random_page_tables(rng, final_lens, PAGE_SIZE, ref.spec.num_pages)
    starts, num_new = [0] * len(prompt_lens), prompt_lens
    for _step in range(3):
        layout = make_layout(starts, num_new, tables, PAGE_SIZE)
        run_step_and_compare(ref, fi, layout, starts)
        starts, num_new = layout.kv_lens, [1] * len(prompt_lens)
    for layer in range(NUM_LAYERS):
        for table, kv_len in zip(tables, final_lens, strict=True):
            cached = read_tokens(fi.kv_cache[layer], table, 0, kv_len)
            assert torch.equal(cached, read_tokens(ref.kv_cache[layer], table, 0, kv_len))


@pytest.mark.parametrize("use_tensor_cores", [False, True])
def test_decode_kernels_agree(use_tensor_cores: bool):
    """Group size 4 has both a CUDA-core and a tensor-core decode kernel: both must match."""
    rng = random.Random(f"decode-kernels/{use_tensor_cores}")
    torch.manual_seed(rng.randrange(2**31))
    starts, num_new = step_lengths(rng, "decode", 16, PAGE_SIZE)
    ref, fi = make_backends(
        torch.bfloat16, 128, 16, 4, num_pages=128, decode_use_tensor_cores=use_tensor_cores
    )
    tables = random_page_tables(rng, [s + 1 for s in starts], PAGE_SIZE, 128)
    write_same_history([ref, fi], tables, starts)
    run_step_and_compare(ref, fi, make_layout(starts, num_new, tables, PAGE_SIZE), starts)


@pytest.mark.parametrize("kind", ["mixed", "decode"])
def test_strided_qkv_views(kind: str):
    """q/k/v as views of one fused projection output (row stride > heads * head_dim)."""
    rng = random.Random(f"strided/{kind}")
    torch.manual_seed(rng.randrange(2**31))
    starts, num_new = step_lengths(rng, kind, 6, PAGE_SIZE)
    ref, fi = make_backends(torch.bfloat16, 128, 28, 4, num_pages=64)
    tables = random_page_tables(rng, [s + n for s, n in zip(starts, num_new, strict=True)], PAGE_SIZE, 64)
    write_same_history([ref, fi], tables, starts)
    run_step_and_compare(ref, fi, make_layout(starts, num_new, tables, PAGE_SIZE), starts, qkv_views=True)


def test_empty_step():
    _, fi = make_backends(torch.bfloat16, 128, 28, 4, num_pages=4)
    fi.plan(BatchLayout([0], [], torch.zeros(0, dtype=torch.int32)))
    empty = torch.empty(0, 4, 128, device="cuda", dtype=torch.bfloat16)
    out = fi.forward(0, torch.empty(0, 28, 128, device="cuda", dtype=torch.bfloat16), empty, empty)
    assert out.shape == (0, 28, 128)
