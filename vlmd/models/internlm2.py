"""InternLM2 / 2.5 (InternVL2-2B/8B/26B, InternVL2.5-2B/8B/26B): Llama's arithmetic under other
names, with q, k and v packed into one `attention.wqkv` matrix grouped by KV head. The loader
maps the names and unpacks the rows (`vlmd.models.layouts`), so the model is Llama's."""

from __future__ import annotations

from vlmd.models.llama import LlamaForCausalLM


class InternLM2ForCausalLM(LlamaForCausalLM):
    pass
