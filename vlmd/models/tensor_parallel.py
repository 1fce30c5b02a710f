"""Tensor parallelism for the language model and the ViT, applied from outside the model files.

`shard_language_model` takes a language model built on the meta device and shrinks it, in place,
to one rank's share (Megatron layout), so that the model file still reads as one-GPU code:

- q/k/v and gate/up are column-parallel: each rank holds whole heads and a slice of the MLP's
  intermediate features. With fewer KV heads than ranks, each KV head is replicated on
  tp / num_kv_heads ranks (rank r keeps head r * num_kv_heads // tp).
- o_proj and down_proj are row-parallel: each rank multiplies its slice of the input features
  and a forward hook sums the partial outputs across ranks (all-reduce). With a fused all-reduce
  (`TPGroup.fused_norm`), small outputs leave the hook unsummed and the add-RMSNorm that follows
  every row-parallel layer sums them in the same kernel as the residual add and the norm.
- The token embedding and the LM head are split along the vocabulary: a rank embeds the ids
  it owns (zeros elsewhere, then all-reduce), and computes the logits of its vocabulary slice
  (then all-gather, so that every rank samples the same token from the same logits).

`shard_vision` does the same to InternViT: each rank holds whole attention heads (q/k/v
column-parallel, the output projection row-parallel) and a slice of the MLP (fc1 column-parallel,
fc2 row-parallel); a row-parallel layer adds its bias once, after the all-reduce. LayerNorms,
layer scales, embeddings and the projector are small and stay whole on every rank.

Both return, per parameter, which slice of the checkpoint tensor the rank must load, so that
every rank reads only its own share from the safetensors files.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vlmd.kernels.collectives import FusedAllReduceNorm, SymmMemAllReduce
from vlmd.models.layers import RMSNorm

log = logging.getLogger("vlmd.worker")


def _all_ranks(ok: bool) -> bool:
    """Whether `ok` holds on every rank of the default group (a collective: all ranks call it)."""
    flag = torch.tensor([int(ok)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@dataclass(frozen=True)
class TPGroup:
    """This process's place in the tensor-parallel group (size 1: no communication)."""

    rank: int = 0
    size: int = 1
    small: SymmMemAllReduce | None = field(default=None, compare=False, repr=False)
    # Takes over the all-reduce of the row-parallel outputs it `fits`, fused into the add-RMSNorm
    # after them: called as fused_norm(x, residual, weight, eps) -> (normed, new residual).
    fused_norm: FusedAllReduceNorm | None = field(default=None, compare=False, repr=False)

    @classmethod
    def join(
        cls,
        init_method: str,
        rank: int,
        size: int,
        cuda: bool,
        timeout_s: float,
        symm_mem_bytes: int = 0,
        fused_norm: tuple[int, int, torch.dtype] | None = None,
        fused_required: bool = True,
        high_priority: bool = False,
    ) -> TPGroup:
        """Become `rank` of a world of `size` processes (NCCL between GPUs, gloo on the CPU);
        a collective waiting longer than `timeout_s` raises instead of hanging. With
        `symm_mem_bytes` (CUDA only), all-reduces up to that size go through symmetric memory;
        with `fused_norm` = (max tokens, hidden size, dtype) (CUDA only), those of up to that many
        rows are fused into the add-RMSNorm that follows them. Where the fusion cannot start,
        `fused_required` stops the rank with the reason; otherwise every rank falls back to NCCL
        when any rank could not start it (the ranks must sum the same way). With `high_priority`
        (CUDA only), NCCL runs the collectives on streams of the device's greatest priority, as
        the steps that wait for them."""
        if size == 1:
            return SINGLE_RANK
        options = None
        if cuda and high_priority:
            options = dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=init_method,
            rank=rank,
            world_size=size,
            timeout=datetime.timedelta(seconds=timeout_s),
            pg_options=options,
        )
        small = fused = None
        if cuda and symm_mem_bytes > 0:
            small = SymmMemAllReduce(torch.device("cuda", torch.cuda.current_device()), symm_mem_bytes)
        if cuda and fused_norm is not None:
            try:
                fused = FusedAllReduceNorm(rank, size, *fused_norm)
            except Exception as exc:
                reason = f"FlashInfer's all-reduce fusion did not start ({type(exc).__name__}: {exc})"
                if fused_required:  # the flag asked for it: stop with the reason, not a trace
                    raise RuntimeError(f"--tp_all_reduce fused: {reason}") from exc
                log.warning("rank %d: %s", rank, reason)
            if not fused_required and not _all_ranks(fused is not None):
                if rank == 0:
                    log.warning(
                        "--tp_all_reduce auto: a rank could not fuse its all-reduces; all sum with NCCL"
                    )
                fused = None  # its buffers stay allocated until the process ends
        return cls(rank, size, small, fused)

    def defers(self, x: torch.Tensor) -> bool:
        """Whether a row-parallel layer leaves its output `x` unsummed, for the add-RMSNorm after
        it to sum (`fused_norm`)."""
        return self.fused_norm is not None and self.fused_norm.fits(x)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `x`: `x` itself, summed in place, or a new tensor (small
        tensors under symmetric memory)."""
        if self.size == 1:
            return x
        if self.small is not None and self.small.fits(x):
            return self.small(x)
        dist.all_reduce(x)
        return x

    def broadcast(self, x: torch.Tensor) -> None:
        """Give every rank rank 0's `x` (in place)."""
        if self.size > 1:
            assert x.is_contiguous(), "a broadcast sends and receives raw storage"
            dist.broadcast(x, src=0)

    def all_gather_last_dim(self, x: torch.Tensor, full: int) -> torch.Tensor:
        """Concatenate every rank's [..., n] slice along the last dim, each padded to the same
        width; the result is cut to `full` columns."""
        if self.size == 1:
            return x
        width = -(-full // self.size)
        padded = nn.functional.pad(x, (0, width - x.shape[-1]))
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat(parts, dim=-1)[..., :full]


SINGLE_RANK = TPGroup()


def end_rank_process(size: int) -> NoReturn:
    """End a rank's process (spawned for a benchmark or a test) once its results are written:
    a barrier, so that no rank leaves while a peer still uses the connections, then os._exit,
    as the server's ranks end. Not destroy_process_group(): once an NCCL collective was captured
    in a CUDA graph it never returned (torch 2.11 + CUDA 13, 2x H100: hung past 50 s, where
    os._exit after the barrier was done in 5 s), and a gloo rank once aborted in teardown."""
    if size > 1:
        dist.barrier()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@dataclass(frozen=True)
class Shard:
    """The rank's slice of a checkpoint tensor: `length` entries from `start` along `dim`."""

    dim: int
    start: int
    length: int

    def take(self, tensor) -> torch.Tensor:
        """Slice a tensor, or a safetensors slice (read from disk only for these entries)."""
        index = [slice(None)] * (self.dim + 1)
        index[self.dim] = slice(self.start, self.start + self.length)
        return tensor[tuple(index)]


def even_split(total: int, size: int, rank: int, what: str) -> tuple[int, int]:
    """(start, length) of rank's equal share of `total`."""
    if total % size:
        raise ValueError(f"{what} ({total}) is not divisible by the tensor-parallel size {size}")
    length = total // size
    return rank * length, length


def vocab_split(vocab: int, size: int, rank: int) -> tuple[int, int]:
    """(start, length): ceil(vocab / size) ids per rank, the last rank taking what is left."""
    width = -(-vocab // size)
    start = min(vocab, rank * width)
    return start, min(vocab, start + width) - start


class VocabParallelEmbedding(nn.Module):
    """Embeds the ids in [start, start + num_ids); other ids get zeros, summed across ranks."""

    def __init__(self, start: int, num_ids: int, hidden_size: int, tp: TPGroup) -> None:
        super().__init__()
        self.start, self.num_ids, self.tp = start, num_ids, tp
        self.weight = nn.Parameter(torch.empty(num_ids, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.num_ids)
        out = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)  # [T, hidden]
        out = out.masked_fill(outside[:, None], 0.0)
        return self.tp.all_reduce(out)


def shard_language_model(model: nn.Module, tp: TPGroup) -> dict[str, Shard]:
    """Shrink a meta-device language model (a `vlmd.models.decoder.CausalLM`) to rank
    `tp.rank`'s share; returns each sharded parameter's slice of the checkpoint (parameters
    not listed are loaded whole)."""
    if tp.size == 1:
        return {}
    arch = model.arch
    shards: dict[str, Shard] = {}
    for i, layer in enumerate(model.model.layers):
        shards |= _shard_attention(layer.self_attn, f"model.layers.{i}.self_attn", arch, tp)
        shards |= _shard_mlp(layer.mlp, f"model.layers.{i}.mlp", arch, tp)
        if tp.fused_norm is not None:
            layer.input_layernorm = AllReduceRMSNorm(arch.hidden_size, arch.rms_norm_eps, tp)
            layer.post_attention_layernorm = AllReduceRMSNorm(arch.hidden_size, arch.rms_norm_eps, tp)
    if tp.fused_norm is not None:
        model.model.norm = AllReduceRMSNorm(arch.hidden_size, arch.rms_norm_eps, tp)
    start, num_ids = vocab_split(arch.vocab_size, tp.size, tp.rank)
    model.model.embed_tokens = VocabParallelEmbedding(start, num_ids, arch.hidden_size, tp)
    shards["model.embed_tokens.weight"] = Shard(0, start, num_ids)
    model.lm_head = nn.Linear(arch.hidden_size, num_ids, bias=False)
    # Only this rank's num_ids columns: on CUDA the head may carry zero rows of padding.
    model.lm_head.register_forward_hook(
        lambda m, args, out: tp.all_gather_last_dim(out[..., :num_ids], arch.vocab_size)
    )
    if arch.tie_word_embeddings:
        model.tie_weights()
    else:
        shards["lm_head.weight"] = Shard(0, start, num_ids)
    return shards


def _row_parallel_hook(tp: TPGroup):
    """A row-parallel layer's forward hook: its output summed across ranks, unless the
    add-RMSNorm after it will sum it (`TPGroup.defers`)."""
    return lambda module, args, out: out if tp.defers(out) else tp.all_reduce(out)


class AllReduceRMSNorm(RMSNorm):
    """The RMSNorm after a row-parallel layer, when the group can fuse: `add` receives that
    layer's output unsummed whenever `TPGroup.defers` it, and sums it across ranks in the same
    kernel as the residual add and the norm."""

    def __init__(self, hidden_size: int, eps: float, tp: TPGroup) -> None:
        super().__init__(hidden_size, eps)
        self.tp = tp

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tp.defers(x):
            return self.tp.fused_norm(x, residual, self.weight, self.eps)
        return super().add(x, residual)


def _shard_attention(attn: nn.Module, prefix: str, arch, tp: TPGroup) -> dict[str, Shard]:
    head_dim, hidden = arch.head_dim, arch.hidden_size
    q_start, num_heads = even_split(arch.num_attention_heads, tp.size, tp.rank, "num_attention_heads")
    if arch.num_key_value_heads >= tp.size:
        kv_start, num_kv = even_split(arch.num_key_value_heads, tp.size, tp.rank, "num_key_value_heads")
    else:
        if tp.size % arch.num_key_value_heads:
            raise ValueError(
                f"tensor-parallel size {tp.size} is not a multiple of num_key_value_heads "
                f"({arch.num_key_value_heads}), so KV heads cannot be replicated evenly"
            )
        kv_start, num_kv = tp.rank * arch.num_key_value_heads // tp.size, 1
    attn.num_heads, attn.num_kv_heads = num_heads, num_kv
    attn.sizes = [num_heads * head_dim, num_kv * head_dim, num_kv * head_dim]
    bias = attn.qkv_bias
    attn.q_proj = nn.Linear(hidden, num_heads * head_dim, bias=bias)
    attn.k_proj = nn.Linear(hidden, num_kv * head_dim, bias=bias)
    attn.v_proj = nn.Linear(hidden, num_kv * head_dim, bias=bias)
    attn.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=False)
    attn.o_proj.register_forward_hook(_row_parallel_hook(tp))
    q = Shard(0, q_start * head_dim, num_heads * head_dim)
    kv = Shard(0, kv_start * head_dim, num_kv * head_dim)
    shards = {f"{prefix}.q_proj.weight": q, f"{prefix}.k_proj.weight": kv, f"{prefix}.v_proj.weight": kv}
    if bias:
        shards |= {f"{prefix}.q_proj.bias": q, f"{prefix}.k_proj.bias": kv, f"{prefix}.v_proj.bias": kv}
    # Qwen3's per-head q/k norms have one weight for every head: each rank loads it whole.
    return shards | {f"{prefix}.o_proj.weight": Shard(1, q_start * head_dim, num_heads * head_dim)}


def _shard_mlp(mlp: nn.Module, prefix: str, arch, tp: TPGroup) -> dict[str, Shard]:
    start, width = even_split(arch.intermediate_size, tp.size, tp.rank, "intermediate_size")
    hidden = arch.hidden_size
    mlp.gate_proj = nn.Linear(hidden, width, bias=False)
    mlp.up_proj = nn.Linear(hidden, width, bias=False)
    mlp.down_proj = nn.Linear(width, hidden, bias=False)
    mlp.down_proj.register_forward_hook(_row_parallel_hook(tp))
    column = Shard(0, start, width)
    return {
        f"{prefix}.gate_proj.weight": column,
        f"{prefix}.up_proj.weight": column,
        f"{prefix}.down_proj.weight": Shard(1, start, width),
    }


class RowParallelLinear(nn.Module):
    """A Linear whose input features are split over the ranks: the partial products are summed
    across ranks, then the (whole) bias is added once."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)  # [..., out_features], this rank's share of the sum
        return self.tp.all_reduce(out) + self.bias


class HeadParallelRMSNorm(nn.Module):
    """InternViT-6B's qk-norm, an RMSNorm across all heads at once, when each rank holds some of
    them: the sum of squares is all-reduced, so every rank divides by the whole row's RMS. Same
    arithmetic as `TorchOps.rms_norm` (float32 variance, weight applied after casting back)."""

    def __init__(self, width: int, full_width: int, eps: float, tp: TPGroup) -> None:
        super().__init__()
        self.full_width, self.eps, self.tp = full_width, eps, tp
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        sum_sq = x32.pow(2).sum(-1, keepdim=True)  # [..., 1]
        variance = self.tp.all_reduce(sum_sq) / self.full_width
        return self.weight * (x32 * torch.rsqrt(variance + self.eps)).to(x.dtype)


def shard_vision(model: nn.Module, tp: TPGroup) -> dict[str, Shard]:
    """Shrink a meta-device InternVLVision to rank `tp.rank`'s share of the ViT's heads and MLP
    features; returns each sharded parameter's slice of the checkpoint (the rest load whole)."""
    if tp.size == 1:
        return {}
    shards: dict[str, Shard] = {}
    for i, layer in enumerate(model.vision_tower.encoder.layer):
        prefix = f"vision_tower.encoder.layer.{i}"
        shards |= _shard_vision_attention(layer.attention, f"{prefix}.attention", model.arch, tp)
        shards |= _shard_vision_mlp(layer.mlp, f"{prefix}.mlp", model.arch, tp)
    return shards


def _shard_vision_attention(attn: nn.Module, prefix: str, arch, tp: TPGroup) -> dict[str, Shard]:
    hidden, head_dim = arch.vision_hidden_size, attn.head_dim
    start, num_heads = even_split(
        arch.vision_num_attention_heads, tp.size, tp.rank, "vision num_attention_heads"
    )
    width = num_heads * head_dim
    bias = arch.vision_attention_bias
    attn.num_heads = num_heads
    attn.q_proj = nn.Linear(hidden, width, bias=bias)
    attn.k_proj = nn.Linear(hidden, width, bias=bias)
    attn.v_proj = nn.Linear(hidden, width, bias=bias)
    attn.projection_layer = RowParallelLinear(width, hidden, tp)
    column = Shard(0, start * head_dim, width)
    shards = {f"{prefix}.{name}.weight": column for name in ("q_proj", "k_proj", "v_proj")}
    if bias:
        shards |= {f"{prefix}.{name}.bias": column for name in ("q_proj", "k_proj", "v_proj")}
    if arch.vision_use_qk_norm:
        eps = arch.vision_layer_norm_eps
        attn.q_norm = HeadParallelRMSNorm(width, hidden, eps, tp)
        attn.k_norm = HeadParallelRMSNorm(width, hidden, eps, tp)
        shards |= {f"{prefix}.q_norm.weight": column, f"{prefix}.k_norm.weight": column}
    shards[f"{prefix}.projection_layer.weight"] = Shard(1, start * head_dim, width)
    return shards


def _shard_vision_mlp(mlp: nn.Module, prefix: str, arch, tp: TPGroup) -> dict[str, Shard]:
    hidden = arch.vision_hidden_size
    start, width = even_split(arch.vision_intermediate_size, tp.size, tp.rank, "vision intermediate_size")
    mlp.fc1 = nn.Linear(hidden, width)
    mlp.fc2 = RowParallelLinear(width, hidden, tp)
    return {
        f"{prefix}.fc1.weight": Shard(0, start, width),
        f"{prefix}.fc1.bias": Shard(0, start, width),
        f"{prefix}.fc2.weight": Shard(1, start, width),
    }
