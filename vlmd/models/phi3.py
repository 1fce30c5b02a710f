"""Phi-3 (InternVL2-4B, Mini-InternVL-Chat-4B-V1-5): Llama's arithmetic with q/k/v packed into one
`qkv_proj` and gate/up into one `gate_up_proj`, which the loader unpacks (`vlmd.models.layouts`),
and LongRoPE, which the rotary applies (`vlmd.models.layers.RotaryEmbedding`)."""

from __future__ import annotations

from vlmd.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    pass
