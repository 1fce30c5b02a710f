"""The attention seam: one backend is chosen at start-up, planned once per step, run per layer.

Model files only ever call `AttentionBackend.forward(layer_idx, q, k, v)`; everything that
depends on the batch (page tables, positions, masks) is prepared in `plan()`, so a FlashInfer
backend can replace the torch reference without touching a model.

KV cache layout (FlashInfer's paged "NHD" layout), one tensor per layer:
    [num_pages, 2, page_size, num_kv_heads, head_dim]   (index 0 of dim 1 is K, 1 is V)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_pages: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def bytes_per_token(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem


@dataclass(frozen=True)
class BatchLayout:
    """The shape of one step's flattened batch, as the attention backend needs it.

    Request i owns rows qo_indptr[i]:qo_indptr[i+1] of the step's q/k/v. Those are its newest
    tokens: after this step its cache holds kv_lens[i] tokens, in the pages `kv_indices` lists for
    it: ceil(kv_lens[i] / page_size) of them, in order, request after request (the CSR page table
    without its indptr, which `kv_indptr` derives). The model runner gathers them on the device
    (`vlmd.kernels.page_table`); `from_page_tables` builds them from lists.
    """

    qo_indptr: list[int]  # [num_reqs + 1]
    kv_lens: list[int]  # [num_reqs]
    kv_indices: torch.Tensor  # int32 [sum of pages per request], on the host or the device

    @classmethod
    def from_page_tables(
        cls, qo_indptr: list[int], kv_lens: list[int], page_tables: list[list[int]], page_size: int
    ) -> BatchLayout:
        """From per-request page tables, each at least long enough for its tokens (pages beyond
        them, reserved ahead of use, are left out)."""
        pages: list[int] = []
        for table, n in zip(page_tables, kv_lens, strict=True):
            assert len(table) * page_size >= n, "page table too short"
            pages += table[: -(-n // page_size)]
        return cls(qo_indptr, kv_lens, torch.tensor(pages, dtype=torch.int32))

    @property
    def num_tokens(self) -> int:
        return self.qo_indptr[-1]

    def pages_of(self, i: int, page_size: int) -> list[int]:
        """Request i's pages (for tests and checks: it reads them back to the host)."""
        indptr = self.kv_indptr(page_size)
        return self.kv_indices[indptr[i] : indptr[i + 1]].tolist()

    def kv_indptr(self, page_size: int) -> list[int]:
        """[num_reqs + 1]: request i's pages are kv_indices[kv_indptr[i]:kv_indptr[i + 1]]."""
        out = [0]
        for n in self.kv_lens:
            out.append(out[-1] + -(-n // page_size))
        assert out[-1] == self.kv_indices.shape[0], "kv_indices does not hold every request's pages"
        return out

    def positions(self) -> list[int]:
        """Absolute position of every row of the flattened batch."""
        out: list[int] = []
        for i, kv_len in enumerate(self.kv_lens):
            num_new = self.qo_indptr[i + 1] - self.qo_indptr[i]
            out.extend(range(kv_len - num_new, kv_len))
        return out


class AttentionBackend(ABC):
    """Paged causal attention over a KV cache that the backend owns.

    Contract: `plan(layout)` is called once per step before any layer runs; then for every layer
    `forward(layer_idx, q, k, v)` appends the step's k/v into the cache at the positions the
    layout gives and returns causal attention of q over each request's whole cache.
    """

    def __init__(
        self, spec: KVCacheSpec, num_q_heads: int, scale: float, kv_cache: list[torch.Tensor] | None = None
    ) -> None:
        """kv_cache: another backend's cache to share (the side steps' backend: --prefill_sms);
        None, a cache of its own."""
        assert num_q_heads % spec.num_kv_heads == 0, "query heads must be a multiple of KV heads"
        self.spec = spec
        self.num_q_heads = num_q_heads
        self.scale = scale
        self.owns_cache = kv_cache is None
        shape = (spec.num_pages, 2, spec.page_size, spec.num_kv_heads, spec.head_dim)
        # empty, not zeros: only written slots are ever read, and untouched pages cost no memory.
        self.kv_cache = kv_cache or [
            torch.empty(shape, dtype=spec.dtype, device=spec.device) for _ in range(spec.num_layers)
        ]

    @abstractmethod
    def plan(self, layout: BatchLayout) -> None:
        """Prepare per-step metadata from the batch layout (host work, once per step)."""

    @abstractmethod
    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [num_tokens, num_q_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim].

        Returns [num_tokens, num_q_heads, head_dim].
        """


class TorchReferenceBackend(AttentionBackend):
    """Plain torch paged attention: the CPU backend and the oracle for kernel tests."""

    def plan(self, layout: BatchLayout) -> None:
        page_size = self.spec.page_size
        device = self.spec.device
        kv_indices = layout.kv_indices.to(device=device, dtype=torch.long)
        kv_indptr = layout.kv_indptr(page_size)
        offsets = torch.arange(page_size, device=device)
        new_slots: list[torch.Tensor] = []
        self._requests: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for i, kv_len in enumerate(layout.kv_lens):
            q_start, q_end = layout.qo_indptr[i], layout.qo_indptr[i + 1]
            num_new = q_end - q_start
            pages = kv_indices[kv_indptr[i] : kv_indptr[i + 1]]
            kv_slots = (pages[:, None] * page_size + offsets[None, :]).flatten()[:kv_len]  # flat cache slots
            new_slots.append(kv_slots[kv_len - num_new :])
            # Query row j sits at position kv_len - num_new + j and sees cache positions <= its own.
            q_pos = torch.arange(kv_len - num_new, kv_len, device=device)
            mask = torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None]  # [num_new, kv_len]
            self._requests.append((q_start, q_end, kv_slots // page_size, kv_slots % page_size, mask))
        slots = torch.cat(new_slots) if new_slots else torch.zeros(0, dtype=torch.long, device=device)
        self._new_pages, self._new_offsets = slots // page_size, slots % page_size

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache = self.kv_cache[layer_idx]
        cache[self._new_pages, 0, self._new_offsets] = k.to(cache.dtype)
        cache[self._new_pages, 1, self._new_offsets] = v.to(cache.dtype)
        group = self.num_q_heads // self.spec.num_kv_heads
        out = torch.empty_like(q)
        for q_start, q_end, pages, offsets, mask in self._requests:
            keys = cache[pages, 0, offsets].repeat_interleave(group, dim=1)  # [kv_len, q_heads, head_dim]
            values = cache[pages, 1, offsets].repeat_interleave(group, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q[q_start:q_end].float(), keys.float()) * self.scale
            scores = scores.masked_fill(~mask[None], float("-inf"))
            probs = torch.softmax(scores, dim=-1)  # [q_heads, num_new, kv_len]
            out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, values.float()).to(q.dtype)
        return out
