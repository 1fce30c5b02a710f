"""The decoder every text family shares (Llama's layout), over a flattened batch: every
request's new tokens are rows of one [T, hidden].

A family differs from Llama only in its attention: Qwen2 adds q/k/v biases, Qwen3 an RMSNorm
over each head of q and k; InternLM2 and Phi-3 are Llama once the loader has unpacked their
packed weights (Phi-3's LongRoPE is the rotary's own option, `RotaryEmbedding`).
The family files (qwen2.py, llama.py, internlm2.py, qwen3.py, phi3.py) hold those variants;
the loader picks one by the architecture's `text_family`.

Attention is the only op that cares where one request ends and the next begins, and that is
the `AttentionBackend`'s job (planned once per step); everything here is row-wise.
Module and parameter names are transformers' Llama names; `vlmd.models.layouts` maps every
checkpoint layout onto them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from vlmd.kernels.attention import AttentionBackend
from vlmd.kernels.ops import TorchOps
from vlmd.models.config import InternVLArch
from vlmd.models.layers import GatedMLP, RMSNorm, RotaryEmbedding, fuse_linears, set_ops


class DecoderAttention(nn.Module):
    """GQA self-attention with rotary positions (Llama's). A family's variant sets `qkv_bias`
    or overrides `norm_heads`."""

    qkv_bias = False

    def __init__(self, arch: InternVLArch, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = arch.num_attention_heads
        self.num_kv_heads = arch.num_key_value_heads
        self.head_dim = arch.head_dim
        hidden = arch.hidden_size
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.sizes = [q_size, kv_size, kv_size]
        self.q_proj = nn.Linear(hidden, q_size, bias=self.qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_size, bias=self.qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_size, bias=self.qkv_bias)
        self.o_proj = nn.Linear(q_size, hidden, bias=False)

    def fuse(self) -> None:
        """One q/k/v GEMM instead of three (the loader calls this once the weights are in)."""
        self.qkv_proj = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, attn: AttentionBackend
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, q_heads, head_dim]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, kv_heads, head_dim]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, kv_heads, head_dim]
        q, k = rotary(positions, *self.norm_heads(q, k))
        out = attn.forward(self.layer_idx, q, k, v)  # [T, q_heads, head_dim]
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))  # [T, hidden]

    def norm_heads(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What happens to q and k between the projection and rotary: nothing, for Llama."""
        return q, k


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, arch: InternVLArch, layer_idx: int, attention: type[DecoderAttention]) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = attention(arch, layer_idx)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = GatedMLP(arch.hidden_size, arch.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        attn: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous sublayer's output (the embeddings for layer 0, with residual None).

        Returns (this layer's MLP output, the residual stream before it); each residual add is
        fused into the norm that follows it.
        """
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm.add(x, residual)
        x = self.self_attn(x, positions, rotary, attn)
        x, residual = self.post_attention_layernorm.add(x, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    """Token embeddings, the decoder stack and the final norm (HF's `LlamaModel`)."""

    def __init__(self, arch: InternVLArch, attention: type[DecoderAttention]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch, i, attention) for i in range(arch.num_hidden_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.rotary = RotaryEmbedding(
            arch.head_dim, arch.rope_theta, arch.rope_short_factor, arch.rope_attention_factor
        )

    def forward(
        self, inputs_embeds: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        *_, hidden = self.forward_in_parts(inputs_embeds, positions, attn, len(self.layers))
        return hidden

    def forward_in_parts(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        layers_per_part: int,
    ) -> Iterator[torch.Tensor | None]:
        """`forward`, `layers_per_part` layers at a time: None after each part but the last, then
        the final-normed hidden (a caller may do other work between parts)."""
        x, residual = inputs_embeds, None
        positions = self.rotary.prepare(positions)
        for start in range(0, len(self.layers), layers_per_part):
            for layer in self.layers[start : start + layers_per_part]:
                x, residual = layer(x, residual, positions, self.rotary, attn)
            if start + layers_per_part < len(self.layers):
                yield None
        yield self.norm.add(x, residual)[0]


# cuBLAS multiplies by a matrix whose rows do not end on a 16-byte boundary with slow fallback
# kernels (a 151674-token vocabulary, or half of it per rank, got align-1/align-2 kernels taking
# 0.46 / 0.67 ms of a batch-64 step): on CUDA the LM head is padded with zero rows to a multiple
# of this, and the logits cut back to the vocabulary.
LM_HEAD_ROW_MULTIPLE = 64


class CausalLM(nn.Module):
    """The language model of an InternVL checkpoint: embed, run the decoder, project to logits.

    The caller embeds the tokens (`embed`), overwrites image placeholder rows with vision
    embeddings, then calls `forward` with the step's positions and a planned attention backend.
    A family's model file subclasses it with its own `attention`.
    """

    attention: type[DecoderAttention] = DecoderAttention

    def __init__(self, arch: InternVLArch) -> None:
        super().__init__()
        self.arch = arch
        self.model = DecoderModel(arch, self.attention)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head; the loader calls it again after loading."""
        if self.arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def fuse(self) -> None:
        """Concatenate q/k/v and gate/up weights, and pad the LM head on CUDA; done once after
        loading."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        if self.lm_head.weight.is_cuda:
            self.pad_lm_head()

    def pad_lm_head(self, multiple: int = LM_HEAD_ROW_MULTIPLE) -> None:
        """Zero rows under the LM head (and the embedding it is tied to), up to a multiple of
        `multiple` rows; `compute_logits` cuts them off again."""
        weight = self.lm_head.weight
        rows = weight.shape[0]
        padded = -(-rows // multiple) * multiple
        if padded == rows:
            return
        table = torch.zeros(padded, weight.shape[1], dtype=weight.dtype, device=weight.device)
        table[:rows] = weight
        param = nn.Parameter(table, requires_grad=False)
        if weight is self.model.embed_tokens.weight:  # tied: lookups never reach the zero rows
            self.model.embed_tokens.weight = param
        self.lm_head.weight = param

    def set_ops(self, ops: TorchOps) -> None:
        """Run the norms, rotary and activations with `ops` (chosen once, at start-up)."""
        set_ops(self, ops)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [T] -> [T, hidden]."""
        return self.model.embed_tokens(input_ids)

    def forward(
        self, inputs_embeds: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        """inputs_embeds: [T, hidden]; positions: [T] int64 -> final-normed hidden [T, hidden]."""
        assert positions.shape == inputs_embeds.shape[:1], "expected a flattened [T, hidden] batch"
        return self.model(inputs_embeds, positions, attn)

    def forward_in_parts(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        layers_per_part: int,
    ) -> Iterator[torch.Tensor | None]:
        """`forward` a few layers at a time (`DecoderModel.forward_in_parts`)."""
        assert positions.shape == inputs_embeds.shape[:1], "expected a flattened [T, hidden] batch"
        return self.model.forward_in_parts(inputs_embeds, positions, attn, layers_per_part)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden: [N, hidden] (usually only each request's last row) -> float32 logits [N, vocab],
        written into `out` where given (a CUDA graph's static output)."""
        logits = self.lm_head(hidden)[:, : self.arch.vocab_size]
        if out is None:
            return logits.float().contiguous()
        return out.copy_(logits)
