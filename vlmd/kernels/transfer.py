"""Host-to-device copies that do not wait for the work already queued on the device.

CUDA copies from pageable host memory by first synchronizing the stream (the runtime's documented
behaviour for host-to-device copies out of pageable memory), so a per-step `.to(device,
non_blocking=True)` of a fresh host tensor makes the host wait for the step in flight, and the
GPU then idles while the host launches the rest of the next step. A copy out of pinned memory is
queued and the host moves on; PyTorch's pinned-memory cache keeps the block alive until the copy
has run.
"""

from __future__ import annotations

import torch


def stage(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` in pinned memory when it is bound for a GPU (as is otherwise): copies out of it,
    by us or by a library we hand it to, are queued without a wait."""
    return host.pin_memory() if device.type == "cuda" else host


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on `device`, without waiting for the device."""
    return on_device(torch.tensor(values, dtype=dtype), device)


def on_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device` (itself when it is there already), without waiting for the device."""
    if tensor.device == device:
        return tensor
    return stage(tensor, device).to(device, non_blocking=True)
