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


def embed_store_view(launch: Launch) -> torch.Tensor | None:
    """The shared EmbedStore as a [rows, hidden] tensor (no copy), or None without images."""
    runtime = launch.runtime
    if not runtime.embed_store:
        return None
    segment = shm.SharedSegment.attach(runtime.embed_store)
    count = runtime.embed_store_rows * runtime.hidden_size
    store = torch.frombuffer(segment.buf, dtype=TORCH_DTYPES[runtime.dtype], count=count)
    return store.view(runtime.embed_store_rows, runtime.hidden_size)


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


def register_for_copies(store: torch.Tensor) -> bool:
    """Page-lock the EmbedStore's mapping for CUDA (cudaHostRegister), so that a step's copy of
    image rows out of it is queued like a copy out of pinned memory: out of pageable memory, CUDA
    first waits for the stream's queued work and holds the calling thread until the copy is done
    (the worker's, which would launch the next decode step meanwhile). False, logged, where CUDA
    refuses; the copies then work as before."""
    size = store.numel() * store.element_size()
    error = torch.cuda.cudart().cudaHostRegister(store.data_ptr(), size, 0)
    if error != 0:  # cudaSuccess
        log.warning("the EmbedStore stays pageable: cudaHostRegister of %d bytes failed (%s)", size, error)
        return False
    log.info("EmbedStore page-locked for CUDA copies (%.2f GiB)", size / 2**30)
    return True


# The CUDA driver's SM resource (CU_DEV_RESOURCE_TYPE_SM) and its green-context flags.
_CU_DEV_RESOURCE_TYPE_SM = 1
_CU_GREEN_CTX_DEFAULT_STREAM = 1
_CU_STREAM_NON_BLOCKING = 1
# CUdevResource: an enum, 92 bytes of padding, then a union whose SM member starts with smCount.
# The struct grew across CUDA versions; each is given room for any of them.
_RESOURCE_BYTES = 1024
_SM_COUNT_OFFSET = 96


class SMSplit:
    """The device's SMs in two disjoint green contexts through the CUDA driver API (torch builds
    each of its green contexts from the device's first SMs, so two of them overlap): `group`, a
    stream on the first `num_sms`, and `rest`, a stream of the greatest priority on all the others.
    Kernels queued on either stream, or captured on it into a CUDA graph and replayed anywhere,
    keep to its SMs."""

    def __init__(self, device: torch.device, num_sms: int) -> None:
        import ctypes

        self._cu = cu = ctypes.CDLL("libcuda.so.1")
        torch.zeros(1, device=device)  # the primary context first, as the driver advises
        handle = ctypes.c_int()
        self._check(cu.cuDeviceGet(ctypes.byref(handle), device.index or 0), "cuDeviceGet")
        whole, group, rest = (ctypes.create_string_buffer(_RESOURCE_BYTES) for _ in range(3))
        self._check(
            cu.cuDeviceGetDevResource(handle, whole, _CU_DEV_RESOURCE_TYPE_SM), "cuDeviceGetDevResource"
        )
        groups = ctypes.c_uint(1)
        self._check(
            cu.cuDevSmResourceSplitByCount(group, ctypes.byref(groups), whole, rest, 0, num_sms),
            "cuDevSmResourceSplitByCount",
        )
        self.group_sms, self.rest_sms = (
            ctypes.c_uint.from_buffer(r, _SM_COUNT_OFFSET).value for r in (group, rest)
        )
        _, greatest = torch.cuda.Stream.priority_range()
        self._contexts = []  # alive as long as their streams
        self.group = self._stream(handle, group, 0, device)
        self.rest = self._stream(handle, rest, greatest, device)

    def _stream(self, handle, resource, priority: int, device: torch.device) -> torch.cuda.ExternalStream:
        import ctypes

        cu = self._cu
        desc, context, stream = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        self._check(
            cu.cuDevResourceGenerateDesc(ctypes.byref(desc), resource, 1), "cuDevResourceGenerateDesc"
        )
        flags = _CU_GREEN_CTX_DEFAULT_STREAM
        self._check(cu.cuGreenCtxCreate(ctypes.byref(context), desc, handle, flags), "cuGreenCtxCreate")
        self._contexts.append(context)
        self._check(
            cu.cuGreenCtxStreamCreate(ctypes.byref(stream), context, _CU_STREAM_NON_BLOCKING, priority),
            "cuGreenCtxStreamCreate",
        )
        return torch.cuda.ExternalStream(stream.value, device=device)

    def _check(self, status: int, call: str) -> None:
        if status != 0:
            import ctypes

            name = ctypes.c_char_p()
            self._cu.cuGetErrorName(status, ctypes.byref(name))
            raise RuntimeError(f"{call} failed: {name.value.decode() if name.value else status}")
