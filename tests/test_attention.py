"""The attention seam on the CPU: the torch reference (the oracle of every attention kernel)
against dense causal SDPA, FlashInfer's host-side page-table metadata, and the backend registry.

The factories here (random page tables, step lengths, direct cache writes and reads) are shared
with tests/test_flashinfer.py.
"""

from __future__ import annotations

import logging
import random

import pytest
import torch
import torch.nn.functional as F

from vlmd.kernels.attention import BatchLayout, KVCacheSpec, TorchReferenceBackend
from vlmd.kernels.flashinfer_backend import PagedKVMetadata, flashinfer_unsupported_reason
from vlmd.kernels.registry import make_attention_backend

PAGE_SIZE = 16
HEAD_DIM = 16  # small: the reference's cost, not its correctness, depends on it
NUM_LAYERS = 2
STEP_KINDS = ("prefill", "chunked", "decode", "mixed")


# --- factories (also used by tests/test_flashinfer.py) ---------------------------------------


def step_lengths(
    rng: random.Random, kind: str, batch_size: int, page_size: int
) -> tuple[list[int], list[int]]:
    """(tokens already cached, new tokens) per request for one step of the given kind.

    Lengths span several pages; every fourth request ends exactly on a page boundary, so both
    partial and full last pages occur. "mixed" cycles through chunk, decode and fresh prefill.
    """
    starts, num_new = [], []
    for i in range(batch_size):
        role = ("chunked", "decode", "prefill")[i % 3] if kind == "mixed" else kind
        if role == "prefill":
            start, new = 0, rng.randint(1, 6 * page_size)
        elif role == "decode":
            start, new = rng.randint(0, 6 * page_size), 1
        else:  # a later chunk of a longer prompt
            start, new = rng.randint(1, 3 * page_size), rng.randint(2, 3 * page_size)
        if i % 4 == 3:
            pad = -(start + new) % page_size
            if start == 0 and new > 1:
                new += pad  # a prefill must start at 0
            else:
                start += pad
        starts.append(start)
        num_new.append(new)
    return starts, num_new


def random_page_tables(
    rng: random.Random, final_lens: list[int], page_size: int, num_pages: int
) -> list[list[int]]:
    """Disjoint page tables, each long enough for its request's final length, drawn from a
    random permutation of the pool (so a request's pages are scattered and out of order)."""
    pool = list(range(num_pages))
    rng.shuffle(pool)
    tables, used = [], 0
    for length in final_lens:
        count = -(-length // page_size)
        tables.append(pool[used : used + count])
        used += count
    assert used <= num_pages, "page pool too small for the test batch"
    return tables


def make_layout(
    starts: list[int], num_new: list[int], tables: list[list[int]], page_size: int
) -> BatchLayout:
    """The layout of a step that adds num_new[i] tokens after starts[i] cached ones. Page tables
    are cut to the pages in use, as the runner's tables grow page by page."""
    qo_indptr, kv_lens, page_tables = [0], [], []
    for start, new, table in zip(starts, num_new, tables, strict=True):
        qo_indptr.append(qo_indptr[-1] + new)
        kv_lens.append(start + new)
        page_tables.append(table[: -(-(start + new) // page_size)])
    return BatchLayout.from_page_tables(qo_indptr, kv_lens, page_tables, page_size)


def write_tokens(cache: torch.Tensor, table: list[int], start: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store k/v [n, kv_heads, head_dim] at positions start.. of a request, straight into one
    layer's cache [num_pages, 2, page_size, kv_heads, head_dim] (stands in for earlier steps)."""
    pos = torch.arange(start, start + k.shape[0], device=cache.device)
    pages = torch.tensor(table, device=cache.device)[pos // cache.shape[2]]
    cache[pages, 0, pos % cache.shape[2]] = k
    cache[pages, 1, pos % cache.shape[2]] = v


def read_tokens(cache: torch.Tensor, table: list[int], start: int, end: int) -> torch.Tensor:
    """k/v of positions [start, end) of a request: [2, end - start, kv_heads, head_dim]."""
    pos = torch.arange(start, end, device=cache.device)
    pages = torch.tensor(table, device=cache.device)[pos // cache.shape[2]]
    return cache[pages, :, pos % cache.shape[2]].transpose(0, 1)


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [n, q_heads, d], the last n positions of a sequence whose k/v are [kv_len, kv_heads, d].

    Returns [n, q_heads, d]; row j sees positions <= kv_len - n + j.
    """
    num_new, kv_len = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    q_pos = torch.arange(kv_len - num_new, kv_len, device=q.device)
    mask = torch.arange(kv_len, device=q.device)[None, :] <= q_pos[:, None]  # [n, kv_len]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),  # [q_heads, n, d]
        k.repeat_interleave(group, dim=1).transpose(0, 1),  # [q_heads, kv_len, d]
        v.repeat_interleave(group, dim=1).transpose(0, 1),
        attn_mask=mask,
        scale=scale,
    )
    return out.transpose(0, 1)  # [n, q_heads, d]


def cpu_spec(num_pages: int, num_kv_heads: int, dtype: torch.dtype = torch.float32) -> KVCacheSpec:
    return KVCacheSpec(NUM_LAYERS, num_pages, PAGE_SIZE, num_kv_heads, HEAD_DIM, dtype, torch.device("cpu"))


# --- TorchReferenceBackend against dense SDPA -------------------------------------------------


@pytest.mark.parametrize("kind", STEP_KINDS)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (8, 2), (14, 2)])  # GQA groups 1, 4, 7
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_reference_matches_dense_sdpa(kind: str, num_q_heads: int, num_kv_heads: int, batch_size: int):
    rng = random.Random(f"{kind}/{num_q_heads}/{batch_size}")
    torch.manual_seed(rng.randrange(2**31))
    starts, num_new = step_lengths(rng, kind, batch_size, PAGE_SIZE)
    kv_lens = [s + n for s, n in zip(starts, num_new, strict=True)]
    spec = cpu_spec(num_pages=8 * batch_size, num_kv_heads=num_kv_heads)
    tables = random_page_tables(rng, kv_lens, PAGE_SIZE, spec.num_pages)
    layout = make_layout(starts, num_new, tables, PAGE_SIZE)
    scale = HEAD_DIM**-0.5
    backend = TorchReferenceBackend(spec, num_q_heads, scale)
    # Whole sequences per layer; the cached part goes straight into the cache.
    seqs = [[torch.randn(2, n, num_kv_heads, HEAD_DIM) for n in kv_lens] for _ in range(NUM_LAYERS)]
    for layer in range(NUM_LAYERS):
        for i, start in enumerate(starts):
            write_tokens(backend.kv_cache[layer], tables[i], 0, *seqs[layer][i][:, :start])

    backend.plan(layout)
    for layer in range(NUM_LAYERS):
        q = torch.randn(layout.num_tokens, num_q_heads, HEAD_DIM)
        k, v = torch.cat([kv[:, s:] for kv, s in zip(seqs[layer], starts, strict=True)], dim=1)
        out = backend.forward(layer, q, k, v)
        for i in range(batch_size):
            rows = slice(layout.qo_indptr[i], layout.qo_indptr[i + 1])
            expected = dense_causal_attention(q[rows], *seqs[layer][i], scale)
            torch.testing.assert_close(out[rows], expected, atol=1e-5, rtol=1e-5)


def test_reference_steps_build_on_their_own_cache():
    """Chunked prefill then decode through one backend: every step reads what earlier steps
    wrote, for requests at different phases in the same batch."""
    rng = random.Random(7)
    torch.manual_seed(7)
    num_q_heads, num_kv_heads = 14, 2
    # new tokens per request per step: one long prompt in chunks, one short, one page-aligned
    steps = [[20, 5, 16], [17, 1, 16], [1, 1, 1], [1, 1, 1], [1, 1, 1]]
    final_lens = [sum(col) for col in zip(*steps, strict=True)]
    spec = cpu_spec(num_pages=16, num_kv_heads=num_kv_heads)
    tables = random_page_tables(rng, final_lens, PAGE_SIZE, spec.num_pages)
    seqs = [[torch.randn(2, n, num_kv_heads, HEAD_DIM) for n in final_lens] for _ in range(NUM_LAYERS)]
    scale = HEAD_DIM**-0.5
    backend = TorchReferenceBackend(spec, num_q_heads, scale)
    starts = [0] * len(final_lens)
    for num_new in steps:
        layout = make_layout(starts, num_new, tables, PAGE_SIZE)
        backend.plan(layout)
        for layer in range(NUM_LAYERS):
            q = torch.randn(layout.num_tokens, num_q_heads, HEAD_DIM)
            k, v = torch.cat(
                [kv[:, s : s + n] for kv, s, n in zip(seqs[layer], starts, num_new, strict=True)], dim=1
            )
            out = backend.forward(layer, q, k, v)
            for i, kv_len in enumerate(layout.kv_lens):
                rows = slice(layout.qo_indptr[i], layout.qo_indptr[i + 1])
                expected = dense_causal_attention(q[rows], *seqs[layer][i][:, :kv_len], scale)
                torch.testing.assert_close(out[rows], expected, atol=1e-5, rtol=1e-5)
        starts = layout.kv_lens


# --- FlashInfer's page-table metadata (host side, no GPU) --------------------------------------


@pytest.mark.parametrize("kind", STEP_KINDS)
def test_flashinfer_metadata_addresses_the_same_slots_as_the_reference(kind: str):
    """Read the CSR page table the way FlashInfer does and check every cached token and every
    appended row lands on the slot the layout assigns it."""
    rng = random.Random(kind)
    starts, num_new = step_lengths(rng, kind, 16, PAGE_SIZE)
    kv_lens = [s + n for s, n in zip(starts, num_new, strict=True)]
    tables = random_page_tables(rng, [n + 2 * PAGE_SIZE for n in kv_lens], PAGE_SIZE, 200)
    layout = make_layout(starts, num_new, tables, PAGE_SIZE)
    # Pages reserved ahead of use must not leak into the CSR table.
    layout = BatchLayout.from_page_tables(layout.qo_indptr, layout.kv_lens, tables, PAGE_SIZE)
    meta = PagedKVMetadata.from_layout(layout, PAGE_SIZE)
    meta.check_integrity(PAGE_SIZE)
    assert meta.is_decode == (kind == "decode")
    for i, kv_len in enumerate(kv_lens):
        pages = meta.kv_indices[meta.kv_indptr[i] : meta.kv_indptr[i + 1]].tolist()
        assert (len(pages) - 1) * PAGE_SIZE + meta.kv_last_page_len[i] == kv_len
        assert pages == tables[i][: len(pages)]
    assert list(zip(meta.batch_indices, meta.positions, strict=True)) == [
        (i, p) for i, (s, k) in enumerate(zip(starts, kv_lens, strict=True)) for p in range(s, k)
    ]
    assert meta.positions == layout.positions()
    # One flat int32 tensor round-trips to the host arrays.
    views = meta.views(meta.to_tensor())
    assert views.positions.dtype == meta.kv_indices.dtype == torch.int32
    assert views.qo_indptr.tolist() == meta.qo_indptr
    assert views.positions.tolist() == meta.positions


def test_layouts_refuse_a_short_page_table():
    with pytest.raises(AssertionError, match="page table too short"):
        BatchLayout.from_page_tables([0, 20], [20], [[3]], PAGE_SIZE)  # 20 tokens need 2 pages of 16
    layout = BatchLayout([0, 20], [20], torch.tensor([3], dtype=torch.int32))
    with pytest.raises(AssertionError, match="does not hold every request's pages"):
        PagedKVMetadata.from_layout(layout, PAGE_SIZE)


# --- backend choice ------------------------------------------------------------------------


def test_flashinfer_unsupported_reasons():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert "not CUDA" in flashinfer_unsupported_reason(128, 28, 4, torch.bfloat16, cpu)
    # Shape reasons do not depend on the machine (a cuda device object needs no GPU).
    assert "float32" in flashinfer_unsupported_reason(128, 28, 4, torch.float32, cuda)
    assert "head_dim 80" in flashinfer_unsupported_reason(80, 16, 16, torch.bfloat16, cuda)
    assert "head_dim 96" in flashinfer_unsupported_reason(96, 16, 16, torch.float16, cuda)
    assert "multiple" in flashinfer_unsupported_reason(128, 6, 4, torch.bfloat16, cuda)


def test_registry_falls_back_to_the_torch_reference_on_cpu(caplog: pytest.LogCaptureFixture):
    logger = logging.getLogger("test.attention")
    with caplog.at_level(logging.INFO, logger="test.attention"):
        backend = make_attention_backend(cpu_spec(4, 2), 8, HEAD_DIM**-0.5, logger=logger)
    assert type(backend) is TorchReferenceBackend
    assert "torch reference" in caplog.text and "not CUDA" in caplog.text
