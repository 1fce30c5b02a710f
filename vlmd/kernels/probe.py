"""Kernels built and checked once at load: a GPU or an install that cannot build or run one
falls back to torch's ops there, with the reason logged, never mid-request. Triton is imported
here once for the kernel modules (None where it does not import: a CPU install)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("vlmd.kernels")

T = TypeVar("T")

try:  # the CUDA path only; a CPU install has no Triton
    import triton
    import triton.language as tl
except Exception as exc:  # noqa: BLE001 - a broken install fails with more than ImportError
    triton = tl = None
    _TRITON_MISSING: Exception | None = exc
else:
    _TRITON_MISSING = None


def require_triton() -> None:
    """Raise (for `built_or_fallback` to log) where Triton does not import."""
    if triton is None:
        raise RuntimeError(f"Triton does not import: {_TRITON_MISSING}")


def built_or_fallback(build: Callable[[], T], fallback: T, what: str) -> T:
    """`build()` (which builds the kernel, runs it on a probe and raises where it fails), else
    `fallback`, logging "`what` op by op (reason)"."""
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - any failure to build or run means the torch ops
        log.warning("%s op by op (%s: %s)", what, type(exc).__name__, exc)
        return fallback
