"""Collective kernels for tensor-parallel ranks on GPUs, beside NCCL: summing small tensors
through PyTorch symmetric memory, and FlashInfer's all-reduce fused with the residual add and
RMSNorm that follow a row-parallel layer. `TPGroup` (vlmd.models.tensor_parallel) decides which
one a tensor takes.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist


class SymmMemAllReduce:
    """All-reduce of small tensors through PyTorch symmetric memory: each rank copies its
    tensor into a buffer every peer can read over NVLink, and one kernel sums all the copies
    (one-shot); larger tensors go to NCCL. On two H200s its kernel was no faster than NCCL's
    low-latency all-reduce and decode steps 1-2% shorter (bench/RESULTS.md)."""

    DTYPES = (torch.bfloat16, torch.float16, torch.float32)

    def __init__(self, device: torch.device, max_bytes: int) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = dist.group.WORLD.group_name
        self.max_bytes = max_bytes
        self.buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)

    def fits(self, x: torch.Tensor) -> bool:
        return (
            x.is_cuda
            and x.dtype in self.DTYPES
            and x.is_contiguous()
            and x.numel() * x.element_size() <= self.max_bytes
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        staging = self.buffer[: x.numel() * x.element_size()].view(x.dtype).view(x.shape)
        out = torch.empty_like(x)
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(staging, x, "sum", self.group_name, out)
        return out


class FusedAllReduceNorm:
    """All-reduce, residual add and RMSNorm in one kernel, for up to `max_tokens` rows:
    FlashInfer's port of TensorRT-LLM's all-reduce fusion (one-shot Lamport protocol for small
    inputs), its buffers shared with the peers through PyTorch symmetric memory (NVLink, no
    multicast). It replaces, after every row-parallel layer, NCCL's all-reduce and the fused
    add-RMSNorm kernel with one kernel; the sum is accumulated in float32."""

    def __init__(self, rank: int, size: int, max_tokens: int, hidden: int, dtype: torch.dtype) -> None:
        from flashinfer.comm import trtllm_ar

        self._ar = trtllm_ar
        self.rank, self.size, self.max_tokens, self.hidden, self.dtype = rank, size, max_tokens, hidden, dtype
        self._handles, self.workspace, self.metadata = (
            trtllm_ar.trtllm_create_ipc_workspace_for_all_reduce_fusion(
                tp_rank=rank,
                tp_size=size,
                max_token_num=max_tokens,
                hidden_dim=hidden,
                use_fp32_lamport=dtype == torch.float32,
                group=dist.group.WORLD,
                create_metadata=True,
                use_symm_dev_mem=False,  # PyTorch's symmetric memory: multicast stays off
            )
        )

    def fits(self, x: torch.Tensor) -> bool:
        return (
            x.is_cuda
            and x.dtype == self.dtype
            and x.dim() == 2
            and 0 < x.shape[0] <= self.max_tokens
            and x.shape[1] == self.hidden
            and x.is_contiguous()
        )

    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(sum of every rank's x + residual), sum + residual), written over x and residual."""
        residual = residual.contiguous()
        with warnings.catch_warnings():  # FlashInfer marks this entry point deprecated for a newer one
            warnings.simplefilter("ignore", DeprecationWarning)
            self._ar.trtllm_allreduce_fusion(
                allreduce_in=x,
                world_size=self.size,
                world_rank=self.rank,
                token_num=x.shape[0],
                hidden_dim=self.hidden,
                workspace_ptrs=self.workspace,
                # A programmatic dependent launch, as the GEMVs around it (vlmd.kernels.gemv):
                # 2x H100, tp 2 batch 1: 3.44 against 3.46 ms per step.
                launch_with_pdl=True,
                trigger_completion_at_end=False,
                fp32_acc=True,
                pattern_code=self._ar.AllReduceFusionPattern.kARResidualRMSNorm,
                use_oneshot=None,  # FlashInfer's choice by size
                allreduce_out=None,
                residual_in=residual,
                residual_out=residual,
                norm_out=x,
                quant_out=None,
                scale_out=None,
                rms_gamma=weight,
                rms_eps=eps,
                scale_factor=None,
                layout_code=None,
                metadata=self.metadata,
            )
        return x, residual
