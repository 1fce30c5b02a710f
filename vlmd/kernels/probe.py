"""Kernels built and checked once at load: a GPU or an install that cannot build or run one
falls back to torch's ops there, with the reason logged, never mid-request."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("vlmd.kernels")

T = TypeVar("T")


def built_or_fallback(build: Callable[[], T], fallback: T, what: str) -> T:
    """`build()` (which builds the kernel, runs it on a probe and raises where it fails), else
    `fallback`, logging "`what` op by op (reason)"."""
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - any failure to build or run means the torch ops
        log.warning("%s op by op (%s: %s)", what, type(exc).__name__, exc)
        return fallback
