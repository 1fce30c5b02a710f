"""Llama (InternVL2-40B's Yi-34B, InternVL2-76B's Llama-3-70B, the -hf conversions of InternLM2):
the shared decoder as it is."""

from __future__ import annotations

from vlmd.models.decoder import CausalLM


class LlamaForCausalLM(CausalLM):
    pass
