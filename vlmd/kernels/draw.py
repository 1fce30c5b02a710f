"""Drawing one token per row of a batch at once: the exponential race with counter-based noise.

A categorical draw from softmax(x / T) over the tokens a row keeps is the argmax of
x / T - log(E) over those tokens, where every E is an independent Exp(1) variable (the
exponential race; Gumbel-max written with E = -log(U)). The E come from a keyed hash of the
token index, not from a generator's stream: a row's noise depends only on its key, which mixes
the request's seed with the position of the token being drawn (`row_keys`), so a seeded
request draws the same tokens whatever else shares its batch, on every tensor-parallel rank, after a preemption,
without any state kept between steps, and the whole batch is one pass over its logits.

A row keeps the tokens whose logit is at least its threshold (top-k, top-p and min-p are
thresholds on the processed logits; `vlmd.kernels.sampler` computes them). A row with inverse
temperature 0 is greedy: its score is the logit itself and the first largest wins, as
torch.argmax.

`torch_draw` is the contract op by op (the CPU, and the reference of the tests); `TritonDraw`
does it in one read of the logits on CUDA; `make_draw` picks one.
"""

from __future__ import annotations

import torch

from vlmd.kernels.probe import built_or_fallback, require_triton, tl, triton

MASK32 = 0xFFFFFFFF
# fmix32, the finaliser of MurmurHash3: a bijection of 32-bit words with full avalanche.
FMIX_1, FMIX_2 = 0x85EBCA6B, 0xC2B2AE35
GOLDEN32 = 0x9E3779B1  # spreads consecutive token indices over the 32-bit words
KEY_MIX = 0xCC9E2D51  # MurmurHash3's c1: derives a key's second word from its first
SMALL_U = 2.0**-10  # below it, -log(1 - u) by its series: 1 - u would lose u's low bits


# --- the torch reference ---------------------------------------------------------------------------


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for int64 x in [0, 2**32): in 16-bit halves, so no product leaves int64."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, FMIX_1)
    h = h ^ (h >> 13)
    h = _mul32(h, FMIX_2)
    return h ^ (h >> 16)


def row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[rows, 2] int64: each row's noise key, two 32-bit words mixed from its seed's words
    (seeds [rows, 2] int64) and its position [rows]: every draw of a request has its own."""
    low = _fmix32(_mul32(positions & MASK32, GOLDEN32) ^ seeds[:, 0])
    # Not fmix32(low ^ ...): the noise's first round is fmix32(token * GOLDEN32 ^ low), and the
    # second round's key must not equal it for a fixed token (then that token's noise is the
    # same extreme value at every draw).
    return torch.stack([low, _fmix32(_mul32(low, KEY_MIX) ^ seeds[:, 1])], dim=1)


def torch_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """-log(E) for every (row, token): [rows, vocab] float32. keys: [rows, 2] from `row_keys`."""
    tokens = torch.arange(vocab, dtype=torch.int64, device=keys.device)
    h = _fmix32(_mul32(tokens, GOLDEN32)[None, :] ^ keys[:, :1])
    h = _fmix32(h ^ keys[:, 1:])
    u = (h.to(torch.float32) + 0.5) * 2.0**-32  # (0, 1]: rounding may reach 1
    series = u * (1.0 + u * (0.5 + u * (1.0 / 3.0)))
    exp = torch.where(u < SMALL_U, series, -torch.log(torch.clamp(1.0 - u, min=2.0**-24)))
    return -torch.log(exp)


def torch_draw(
    logits: torch.Tensor,
    inv_temperature: torch.Tensor,
    thresholds: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """logits [rows, vocab] float32; inv_temperature [rows] float32 (0: greedy); thresholds [rows]
    float32 (the smallest logit a row keeps); seeds [rows, 2] int64 (a seed's low and high 32-bit
    words); positions [rows] int64. Returns [rows] int64."""
    scale = inv_temperature[:, None]
    noise = torch_noise(row_keys(seeds, positions), logits.shape[-1])
    scores = torch.where(scale > 0, logits * scale + noise, logits)
    scores = scores.masked_fill(logits < thresholds[:, None], float("-inf"))
    return scores.argmax(dim=-1)


# --- the Triton kernels ----------------------------------------------------------------------------

if triton is not None:  # the CUDA path only; a CPU install has no Triton
    # The constants are written out: a jitted function may read no module global but constexprs.
    # They are FMIX_1, FMIX_2, GOLDEN32, KEY_MIX and SMALL_U (uint32 literals: products wrap at 2**32).

    @triton.jit
    def _fmix32_tl(h):
        h ^= h >> 16
        h *= 0x85EBCA6B
        h ^= h >> 13
        h *= 0xC2B2AE35
        return h ^ (h >> 16)

    @triton.jit
    def _chunk_draw_kernel(
        logits_ptr,
        row_stride,
        vocab,
        inv_t_ptr,
        thr_ptr,
        seeds_ptr,
        positions_ptr,
        best_ptr,
        arg_ptr,
        BLOCK: tl.constexpr,
    ):
        row, chunk = tl.program_id(0), tl.program_id(1)
        cols = chunk * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + row.to(tl.int64) * row_stride + cols, mask=cols < vocab, other=float("-inf"))
        inv_t = tl.load(inv_t_ptr + row)
        position = tl.load(positions_ptr + row).to(tl.uint32)
        key_lo = _fmix32_tl((position * 0x9E3779B1) ^ tl.load(seeds_ptr + 2 * row).to(tl.uint32))
        key_hi = _fmix32_tl((key_lo * 0xCC9E2D51) ^ tl.load(seeds_ptr + 2 * row + 1).to(tl.uint32))
        h = _fmix32_tl((cols.to(tl.uint32) * 0x9E3779B1) ^ key_lo)
        h = _fmix32_tl(h ^ key_hi)
        u = (h.to(tl.float32) + 0.5) * 2.3283064365386963e-10  # 2**-32
        series = u * (1.0 + u * (0.5 + u * (1.0 / 3.0)))
        exp = tl.where(u < 0.0009765625, series, -tl.log(tl.maximum(1.0 - u, 5.960464477539063e-08)))
        scores = tl.where(inv_t > 0, x * inv_t - tl.log(exp), x)
        scores = tl.where(x < tl.load(thr_ptr + row), float("-inf"), scores)
        out = row * tl.num_programs(1) + chunk
        tl.store(best_ptr + out, tl.max(scores, axis=0))
        tl.store(arg_ptr + out, chunk * BLOCK + tl.argmax(scores, axis=0, tie_break_left=True))

    @triton.jit
    def _combine_draw_kernel(best_ptr, arg_ptr, num_chunks, token_ptr, CHUNKS: tl.constexpr):
        row = tl.program_id(0)
        chunks = tl.arange(0, CHUNKS)
        best = tl.load(best_ptr + row * num_chunks + chunks, mask=chunks < num_chunks, other=float("-inf"))
        first = tl.argmax(best, axis=0, tie_break_left=True)  # chunks in index order: the first
        tl.store(token_ptr + row, tl.load(arg_ptr + row * num_chunks + first).to(tl.int64))


class TritonDraw:
    """Two Triton kernels over float32 logits whose rows are contiguous: per chunk of a row the
    best score and its index, then the best chunk of each row."""

    BLOCK = 4096  # logits per program

    def __init__(self) -> None:
        require_triton()

    def __call__(self, logits, inv_temperature, thresholds, seeds, positions) -> torch.Tensor:
        if logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(1) != 1:
            return torch_draw(logits, inv_temperature, thresholds, seeds, positions)
        seeds, positions = seeds.contiguous(), positions.contiguous()
        rows, vocab = logits.shape
        chunks = triton.cdiv(vocab, self.BLOCK)
        best = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device)
        args = torch.empty(rows, chunks, dtype=torch.int32, device=logits.device)
        _chunk_draw_kernel[(rows, chunks)](
            logits,
            logits.stride(0),
            vocab,
            inv_temperature,
            thresholds,
            seeds,
            positions,
            best,
            args,
            BLOCK=self.BLOCK,
            num_warps=8,
        )
        tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
        _combine_draw_kernel[(rows,)](
            best, args, chunks, tokens, CHUNKS=triton.next_power_of_2(chunks), num_warps=1
        )
        return tokens


def make_draw(device: torch.device):
    """Triton's kernels on CUDA, built and checked against the torch reference once here (a GPU
    or an install they cannot build for falls back at load, not mid-request); else torch."""
    if device.type != "cuda":
        return torch_draw

    def build() -> TritonDraw:
        fused = TritonDraw()
        generator = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(4, 3 * TritonDraw.BLOCK + 5, device=device, generator=generator)
        inv_t = torch.tensor([1.0, 0.0, 2.0, 0.5], device=device)
        thresholds = torch.tensor([float("-inf"), float("-inf"), 1.0, 0.0], device=device)
        seeds = torch.tensor([[7, 0], [7, 0], [2**32 - 1, 2**31 - 1], [5, 9]], device=device)
        positions = torch.tensor([0, 1, 2**20, 3], device=device)
        args = (logits, inv_t, thresholds, seeds, positions)
        if not torch.equal(fused(*args), torch_draw(*args)):
            raise RuntimeError("its tokens differ from the torch reference's")
        return fused

    return built_or_fallback(build, torch_draw, "sampling's token draw runs (Triton's kernels failed)")
