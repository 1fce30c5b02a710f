"""Picks the attention backend once, at start-up: FlashInfer where it is safe, else torch."""

from __future__ import annotations

import logging

import torch

from vlmd.kernels.attention import AttentionBackend, KVCacheSpec, TorchReferenceBackend
from vlmd.kernels.flashinfer_backend import FlashInferBackend, flashinfer_unsupported_reason


def make_attention_backend(
    spec: KVCacheSpec,
    num_q_heads: int,
    scale: float,
    logger: logging.Logger | None = None,
    kv_cache: list[torch.Tensor] | None = None,
) -> AttentionBackend:
    """FlashInfer on a CUDA device when it can serve this shape, otherwise the torch reference;
    over `kv_cache` when given (another backend's), else a cache of its own.

    A fallback on a CUDA device is logged as a warning (it costs a lot of speed); on the CPU the
    torch backend is the expected one and is logged at info level.
    """
    log = logger or logging.getLogger("vlmd.kernels")
    reason = flashinfer_unsupported_reason(
        spec.head_dim, num_q_heads, spec.num_kv_heads, spec.dtype, spec.device
    )
    if reason is None:
        log.info("attention backend: FlashInfer")
        return FlashInferBackend(spec, num_q_heads, scale, kv_cache)
    level = logging.WARNING if torch.device(spec.device).type == "cuda" else logging.INFO
    log.log(level, "attention backend: torch reference (FlashInfer not used: %s)", reason)
    return TorchReferenceBackend(spec, num_q_heads, scale, kv_cache)
