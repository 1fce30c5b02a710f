"""Attention inside ViT tiles: each tile's tokens attend to each other, tiles never mix.

The vision tower hands q/k/v over as [tiles, seq, heads, head_dim] views of its fused q/k/v
projection and takes the output back in that layout. `SdpaTileAttention` is torch's
scaled_dot_product_attention (cuDNN's flash kernel on an H100, the CPU's math elsewhere);
`FlashInferTileAttention` runs FlashInfer's ragged prefill (FA3 on Hopper) over the tiles as a
batch of equal-length sequences, reading the views through their strides. FlashInfer is the
default on GPUs: on an H100 its kernel took 3.85 ms of a 12-tile forward where SDPA's took 4.58
(bench/RESULTS.md run 9).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from vlmd.kernels.flashinfer_backend import SUPPORTED_HEAD_DIMS

# FlashInfer splits long KV across CTAs through this scratch space (its recommended 128 MiB is for
# batches of long prompts; a ViT's 1025-token tiles need far less).
WORKSPACE_BYTES = 64 * 2**20
# Tile counts up to this keep a planned wrapper each: a CUDA graph captures that wrapper's
# kernels and its plan (in the wrapper's own device memory) must outlive the capture. Larger
# batches share one wrapper, planned again whenever the tile count changes.
PLANNED_TILE_COUNTS = 32


class SdpaTileAttention:
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q, k, v: [tiles, seq, heads, head_dim] -> [tiles, seq, heads, head_dim]."""
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
        )
        return out.transpose(1, 2)


SDPA_TILE_ATTENTION = SdpaTileAttention()


class FlashInferTileAttention:
    """FlashInfer's batch ragged prefill, non-causal, one sequence per tile (CUDA, fp16/bf16)."""

    def __init__(self, device: torch.device) -> None:
        import flashinfer

        self._flashinfer = flashinfer
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        # (tiles, seq, heads, head_dim, dtype, scale) -> planned wrapper: one per small tile count,
        # and at most one for all larger batches.
        self._planned: dict[tuple, object] = {}
        self._shared: dict[tuple, object] = {}

    def _wrapper(
        self, num_tiles: int, seq_len: int, heads: int, head_dim: int, dtype: torch.dtype, scale: float
    ):
        key = (num_tiles, seq_len, heads, head_dim, dtype, scale)
        kept = self._planned if num_tiles <= PLANNED_TILE_COUNTS else self._shared
        wrapper = kept.get(key)
        if wrapper is not None:
            return wrapper
        wrapper = self._flashinfer.BatchPrefillWithRaggedKVCacheWrapper(self.workspace, "NHD")
        indptr = torch.arange(0, (num_tiles + 1) * seq_len, seq_len, dtype=torch.int32)
        wrapper.plan(
            indptr,
            indptr,
            num_qo_heads=heads,
            num_kv_heads=heads,
            head_dim_qk=head_dim,
            causal=False,
            sm_scale=scale,
            q_data_type=dtype,
            kv_data_type=dtype,
        )
        if kept is self._shared:
            kept.clear()  # larger batches: one wrapper, planned again for each new tile count
        kept[key] = wrapper
        return wrapper

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        num_tiles, seq_len, heads, head_dim = q.shape
        wrapper = self._wrapper(num_tiles, seq_len, heads, head_dim, q.dtype, scale)
        # [tiles * seq, heads, head_dim]: still views (a tile's rows follow the previous tile's).
        out = wrapper.run(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1))
        return out.view(num_tiles, seq_len, heads, head_dim)


def make_tile_attention(
    kind: str, device: torch.device, dtype: torch.dtype, head_dim: int, logger: logging.Logger | None = None
):
    """The ViT's attention: FlashInfer for `kind` "flashinfer" or "auto" where it can serve (CUDA,
    half precision, a head dim FlashInfer instantiates, flashinfer importable), else torch's SDPA.
    Where FlashInfer cannot serve, the reason is logged (a warning where it was asked for);
    "auto" off GPUs says nothing (SDPA is all there is)."""
    log = logger or logging.getLogger("vlmd.vision")
    if kind == "sdpa":
        return SDPA_TILE_ATTENTION
    reason = None
    if torch.device(device).type != "cuda":
        if kind == "auto":
            return SDPA_TILE_ATTENTION
        reason = "not on CUDA"
    elif dtype not in (torch.float16, torch.bfloat16):
        reason = f"dtype {dtype} is not float16/bfloat16"
    elif head_dim not in SUPPORTED_HEAD_DIMS:
        reason = f"head_dim {head_dim} is not one of {SUPPORTED_HEAD_DIMS}"
    else:
        try:
            attention = FlashInferTileAttention(torch.device(device))
        except ImportError as exc:
            reason = f"flashinfer is not importable ({exc})"
        else:
            log.info("ViT attention: FlashInfer (ragged prefill over tiles)")
            return attention
    if kind == "flashinfer":
        log.warning("ViT attention: torch SDPA (FlashInfer asked for, but %s)", reason)
    else:
        log.info("ViT attention: torch SDPA (FlashInfer by default, but %s)", reason)
    return SDPA_TILE_ATTENTION
