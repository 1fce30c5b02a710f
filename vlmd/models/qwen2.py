"""Qwen2 / Qwen2.5 (InternVL2-1B, InternVL2.5-1B/4B/38B/78B, InternVL3-1B..78B but 9B):
Llama's decoder with biases on the q/k/v projections."""

from __future__ import annotations

from vlmd.models.decoder import CausalLM, DecoderAttention


class Qwen2Attention(DecoderAttention):
    qkv_bias = True


class Qwen2ForCausalLM(CausalLM):
    attention = Qwen2Attention
