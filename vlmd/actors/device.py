"""What the actors that run a model on a device share: the LM workers and the ViT ranks (which,
under --vit_placement worker, live in the same process)."""

from __future__ import annotations

import logging

import torch

from vlmd import shm
from vlmd.actors.launch import Launch

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A collective that waits longer than this raises instead of hanging the rank forever.
TP_TIMEOUT_S = 600

log = logging.getLogger("vlmd.worker")


def embed_store_view(launch: Launch, device: torch.device) -> torch.Tensor | None:
    """The shared EmbedStore as a [rows, hidden] tensor (no copy), or None without images: one
    mapping per process (a worker and the ViT it hosts share it), page-locked for copies to and
    from `device` where it is a GPU (`_page_lock`)."""
    runtime = launch.runtime
    if not runtime.embed_store:
        return None
    store = _STORE_VIEWS.get(runtime.embed_store)
    if store is None:
        segment = shm.SharedSegment.attach(runtime.embed_store)
        count = runtime.embed_store_rows * runtime.hidden_size
        store = torch.frombuffer(segment.buf, dtype=TORCH_DTYPES[runtime.dtype], count=count)
        store = _STORE_VIEWS[runtime.embed_store] = store.view(runtime.embed_store_rows, runtime.hidden_size)
        if device.type == "cuda":
            _page_lock(store)
    return store


_STORE_VIEWS: dict[str, torch.Tensor] = {}  # this process's EmbedStore mapping, by segment name


def green_stream(device: torch.device, num_sms: int, flag: str) -> tuple[object, torch.cuda.Stream]:
    """A CUDA green context of `num_sms` of the device's SMs, and a stream on it (RuntimeError,
    naming `flag`, where this torch or device has none: the worker stops at start-up with the
    reason). Kernels queued on the stream run on those SMs only."""
    total = torch.cuda.get_device_properties(device).multi_processor_count
    if num_sms >= total:
        raise RuntimeError(f"{flag} {num_sms}: the device has {total} SMs; leave some to the decode steps")
    green_context = getattr(torch.cuda, "GreenContext", None)
    if green_context is None or not hasattr(green_context, "Stream"):
        raise RuntimeError(
            f"{flag} needs CUDA green contexts with streams, which torch {torch.__version__} lacks"
        )
    context = green_context.create(num_sms=num_sms, device_id=device.index)
    return context, context.Stream()


def _page_lock(store: torch.Tensor) -> bool:
    """Page-lock the EmbedStore's mapping for CUDA (cudaHostRegister), so that copies of image
    rows into and out of it are queued like copies of pinned memory: with pageable memory, CUDA
    first waits for the stream's queued work and holds the calling thread until the copy is done
    (a worker's, which would launch the next decode step meanwhile). False, logged, where CUDA
    refuses; the copies then work as before."""
    size = store.numel() * store.element_size()
    error = torch.cuda.cudart().cudaHostRegister(store.data_ptr(), size, 0)
    if error != 0:  # cudaSuccess
        log.warning("the EmbedStore stays pageable: cudaHostRegister of %d bytes failed (%s)", size, error)
        return False
    log.info("EmbedStore page-locked for CUDA copies (%.2f GiB)", size / 2**30)
    return True
