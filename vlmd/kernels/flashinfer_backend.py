"""FlashInfer paged attention behind the `AttentionBackend` seam (written against FlashInfer 0.7.2).

One step = one plan: the host turns the `BatchLayout` into FlashInfer's CSR page table once, copies
it to the GPU in one transfer (the wrapper's own plan adds a few small ones) and plans one
wrapper; every layer then appends its k/v into its cache and runs that wrapper. A step where every request brings exactly one token uses the
decode wrapper; any other step (prefill, chunked prefill, or prefill mixed with decodes) runs the
paged prefill wrapper with a causal mask over the whole batch.

flashinfer is imported lazily so this module imports on machines without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from vlmd.kernels.attention import AttentionBackend, BatchLayout, KVCacheSpec
from vlmd.kernels.ops import last_dim_contiguous
from vlmd.kernels.transfer import on_device, stage

# FlashInfer's docs recommend 128 MiB for the float workspace (split-KV partial outputs); the
# prefill and decode wrappers share it, since only one of them runs in a step.
WORKSPACE_BYTES = 128 * 2**20

# Head dims FlashInfer prefill is known to serve correctly: FA3 (sm90) instantiates 64/128/256,
# and the device notes found 80 and 96 unsafe for prefill.
SUPPORTED_HEAD_DIMS = (64, 128, 256)

# The CUDA-core decode kernel is instantiated for these query-per-KV-head group sizes only
# (DISPATCH_GQA_GROUP_SIZE); tensor-core decode serves any group size.
CUDA_CORE_DECODE_GROUP_SIZES = (1, 2, 3, 4, 6, 8, 16)

HALF_DTYPES = (torch.float16, torch.bfloat16)


def flashinfer_unsupported_reason(
    head_dim: int, num_q_heads: int, num_kv_heads: int, dtype: torch.dtype, device: torch.device
) -> str | None:
    """Why FlashInfer cannot serve this attention shape safely here, or None if it can.

    Cheap shape checks come first, so the answer does not depend on the machine when the shape
    alone rules FlashInfer out.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return f"device is {device.type}, not CUDA"
    if dtype not in HALF_DTYPES:
        return f"dtype {dtype} is not float16/bfloat16"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} is not one of {SUPPORTED_HEAD_DIMS} (prefill is unsafe for others)"
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads != 0:
        return f"{num_q_heads} query heads are not a multiple of {num_kv_heads} KV heads"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "GPU compute capability is below 8.0"
    try:
        import flashinfer  # noqa: F401
    except Exception as exc:  # an incomplete install fails with OSError/RuntimeError too
        return f"flashinfer is not importable ({type(exc).__name__}: {exc})"
    return None


class PagedKVTensors(NamedTuple):
    """`PagedKVMetadata`'s host arrays as int32 tensors (views of one flat tensor)."""

    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_last_page_len: torch.Tensor
    batch_indices: torch.Tensor
    positions: torch.Tensor


@dataclass(frozen=True)
class PagedKVMetadata:
    """One step's batch in FlashInfer's CSR page-table form: host lists, per request or per new
    token, and the page indices as the layout gives them (a tensor, on the device when the model
    runner gathered them there).

    Request i owns pages kv_indices[kv_indptr[i]:kv_indptr[i+1]], all full except the last, which
    holds kv_last_page_len[i] tokens (1..page_size). New row t belongs to request
    batch_indices[t] and sits at position positions[t] of that request. The list fields are in
    `PagedKVTensors` order.
    """

    qo_indptr: list[int]  # [num_reqs + 1]
    kv_indptr: list[int]  # [num_reqs + 1]
    kv_last_page_len: list[int]  # [num_reqs]
    batch_indices: list[int]  # [num_tokens]
    positions: list[int]  # [num_tokens]
    kv_indices: torch.Tensor  # int32 [kv_indptr[-1]]

    @classmethod
    def from_layout(cls, layout: BatchLayout, page_size: int) -> PagedKVMetadata:
        last_page_len, batch_indices, positions = [], [], []
        for i, kv_len in enumerate(layout.kv_lens):
            num_new = layout.qo_indptr[i + 1] - layout.qo_indptr[i]
            assert 1 <= num_new <= kv_len, f"request {i}: {num_new} new tokens, kv_len {kv_len}"
            last_page_len.append((kv_len - 1) % page_size + 1)
            batch_indices += [i] * num_new
            positions += range(kv_len - num_new, kv_len)
        kv_indptr = layout.kv_indptr(page_size)
        return cls(
            list(layout.qo_indptr), kv_indptr, last_page_len, batch_indices, positions, layout.kv_indices
        )

    @property
    def num_reqs(self) -> int:
        return len(self.kv_last_page_len)

    @property
    def is_decode(self) -> bool:
        """Every request brings exactly one new token."""
        return self.qo_indptr[-1] == self.num_reqs

    def to_tensor(self) -> torch.Tensor:
        """The host lists back to back in one int32 tensor, so one copy moves them all."""
        return torch.tensor(
            [x for name in PagedKVTensors._fields for x in getattr(self, name)], dtype=torch.int32
        )

    def views(self, flat: torch.Tensor) -> PagedKVTensors:
        """Split a tensor made by `to_tensor` (or a copy of it) into its arrays."""
        return PagedKVTensors(*flat.split([len(getattr(self, name)) for name in PagedKVTensors._fields]))

    def check_integrity(self, page_size: int) -> None:
        assert len(self.qo_indptr) == len(self.kv_indptr) == self.num_reqs + 1
        assert self.kv_indptr[-1] == self.kv_indices.shape[0]
        assert all(1 <= n <= page_size for n in self.kv_last_page_len)
        assert len(self.batch_indices) == len(self.positions) == self.qo_indptr[-1]
        for i in range(self.num_reqs):
            num_pages = self.kv_indptr[i + 1] - self.kv_indptr[i]
            kv_len = (num_pages - 1) * page_size + self.kv_last_page_len[i]
            rows = range(self.qo_indptr[i], self.qo_indptr[i + 1])
            assert [self.positions[t] for t in rows] == list(range(kv_len - len(rows), kv_len))
            assert all(self.batch_indices[t] == i for t in rows)


class FlashInferBackend(AttentionBackend):
    """Paged causal attention with FlashInfer kernels; same contract as `TorchReferenceBackend`.

    Needs a CUDA device, float16/bfloat16 and a head dim in SUPPORTED_HEAD_DIMS (see
    `flashinfer_unsupported_reason`). q/k/v must have the cache's dtype.
    """

    def __init__(
        self,
        spec: KVCacheSpec,
        num_q_heads: int,
        scale: float,
        kv_cache: list[torch.Tensor] | None = None,
        *,
        decode_use_tensor_cores: bool | None = None,
    ) -> None:
        """decode_use_tensor_cores: None picks tensor cores for GQA groups of 4 or more (faster
        for large groups, and the only kernel for group sizes like 7); tests force either path."""
        reason = flashinfer_unsupported_reason(
            spec.head_dim, num_q_heads, spec.num_kv_heads, spec.dtype, spec.device
        )
        if reason is not None:
            raise ValueError(f"FlashInfer cannot serve this model: {reason}")
        super().__init__(spec, num_q_heads, scale, kv_cache)
        import flashinfer

        # Insurance, once: should a kernel load a partial page's unwritten tail before masking
        # it, never-written memory may hold NaN bit patterns, which a zero probability does not
        # cancel (0 * NaN = NaN). Tails of reused pages hold finite old k/v.
        for cache in self.kv_cache if self.owns_cache else []:
            cache.zero_()
        group_size = num_q_heads // spec.num_kv_heads
        if decode_use_tensor_cores is None:
            decode_use_tensor_cores = group_size >= 4
        assert decode_use_tensor_cores or group_size in CUDA_CORE_DECODE_GROUP_SIZES, (
            f"CUDA-core decode has no kernel for GQA group size {group_size}"
        )
        # The decode wrapper wants a zeroed float workspace on first use.
        workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=spec.device)
        # CUDA-graph decode wrappers share it too (steps never overlap); a side steps' backend
        # (--prefill_sms), whose steps overlap the others, has one of its own.
        self.workspace = workspace
        self.decode_use_tensor_cores = decode_use_tensor_cores
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace, "NHD", use_tensor_cores=decode_use_tensor_cores
        )
        self._append_paged_kv_cache = flashinfer.append_paged_kv_cache
        self._wrapper = None  # the wrapper planned for the current step; None for an empty step
        self._meta: PagedKVTensors | None = None  # the current step's metadata, on the device
        self._num_tokens = 0

    def plan(self, layout: BatchLayout) -> None:
        spec = self.spec
        meta = PagedKVMetadata.from_layout(layout, spec.page_size)
        self._num_tokens = layout.num_tokens
        if meta.num_reqs == 0:
            self._wrapper = None
            return
        # Pinned, so that our copy and the wrappers' copies out of it wait for nothing.
        host_flat = stage(meta.to_tensor(), spec.device)
        host = meta.views(host_flat)
        self._meta = meta.views(host_flat.to(spec.device, non_blocking=True))
        self._kv_indices = on_device(meta.kv_indices, spec.device)
        # The wrappers read indptr / last_page_len on the host to schedule work: handing them the
        # host copies spares a device-to-host sync. The page indices are only read on the device.
        common = dict(
            num_qo_heads=self.num_q_heads,
            num_kv_heads=spec.num_kv_heads,
            page_size=spec.page_size,
            sm_scale=self.scale,
            q_data_type=spec.dtype,
            kv_data_type=spec.dtype,
        )
        if meta.is_decode:
            self._decode.plan(
                host.kv_indptr, self._kv_indices, host.kv_last_page_len, head_dim=spec.head_dim, **common
            )
            self._wrapper = self._decode
        else:
            self._prefill.plan(
                host.qo_indptr,
                host.kv_indptr,
                self._kv_indices,
                host.kv_last_page_len,
                head_dim_qk=spec.head_dim,
                causal=True,  # bottom-right aligned: row j of a request sees positions <= its own
                **common,
            )
            self._wrapper = self._prefill

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        assert q.shape == (self._num_tokens, self.num_q_heads, spec.head_dim), q.shape
        assert k.shape == v.shape == (self._num_tokens, spec.num_kv_heads, spec.head_dim), k.shape
        # append_paged_kv_cache reinterprets k/v as the cache's element type without checking.
        assert q.dtype == k.dtype == v.dtype == spec.dtype, (q.dtype, k.dtype, v.dtype, spec.dtype)
        if self._wrapper is None:
            return torch.empty_like(q)
        meta, cache = self._meta, self.kv_cache[layer_idx]  # cache: [pages, 2, page_size, kv_heads, dim]
        self._append_paged_kv_cache(
            last_dim_contiguous(k),
            last_dim_contiguous(v),
            meta.batch_indices,
            meta.positions,
            cache,
            self._kv_indices,
            meta.kv_indptr,
            meta.kv_last_page_len,
            kv_layout="NHD",
        )
        return self._wrapper.run(last_dim_contiguous(q), cache)  # [num_tokens, q_heads, head_dim]
