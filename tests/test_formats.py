"""config.json dialects (`vlmd.models.formats`) and checkpoint layouts (`vlmd.models.layouts`):
what is detected from config.json alone, what is refused, and where every parameter's rows lie."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from vlmd.models.config import SUPPORTED, InternVLArch
from vlmd.models.layouts import LANGUAGE, VISION, GroupedHeads, LayoutError, component_sources

INTERNVIT_300M = {
    "architectures": ["InternVisionModel"],
    "model_type": "intern_vit_6b",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "image_size": 448,
    "patch_size": 14,
    "num_channels": 3,
    "qkv_bias": True,
    "qk_normalization": False,
    "norm_type": "layer_norm",
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu",
    "drop_path_rate": 0.0,
    "use_flash_attn": True,
}
INTERNVIT_6B = INTERNVIT_300M | {
    "hidden_size": 3200,
    "intermediate_size": 12800,
    "num_attention_heads": 25,
    "num_hidden_layers": 45,
    "qkv_bias": False,
    "qk_normalization": True,
    "norm_type": "rms_norm",
}
INTERNLM2_1_8B = {  # InternVL2-2B's language model, as its config.json writes it
    "architectures": ["InternLM2ForCausalLM"],
    "model_type": "internlm2",
    "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"},
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "num_hidden_layers": 24,
    "vocab_size": 92553,
    "bias": False,
    "rope_theta": 1000000,
    "rope_scaling": {"type": "dynamic", "factor": 2.0},
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
QWEN3_8B = {  # InternVL3.5-8B's
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "num_hidden_layers": 36,
    "vocab_size": 151936,
    "attention_bias": False,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "tie_word_embeddings": False,
}
PHI3_MINI_128K = {  # InternVL2-4B's (its factors replaced by constants: the test reads them back)
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32064,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": {"type": "su", "long_factor": [1.0] * 48, "short_factor": [1.05] * 48},
    "sliding_window": 262144,
    "tie_word_embeddings": False,
}


def opengvlab_config(llm: dict, vision: dict = INTERNVIT_300M, **top) -> dict:
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "template": "internlm2-chat",
        "force_image_size": 448,
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 12,
        "downsample_ratio": 0.5,
        "ps_version": "v2",
        "select_layer": -1,
        "torch_dtype": "bfloat16",
        "llm_config": copy.deepcopy(llm),
        "vision_config": copy.deepcopy(vision),
    } | top


def test_internlm2_checkpoint_is_detected_from_its_config():
    arch = InternVLArch.from_config_dict(opengvlab_config(INTERNLM2_1_8B))
    assert (arch.layout, arch.text_family, arch.template) == ("opengvlab", "internlm2", "internlm2-chat")
    assert (arch.hidden_size, arch.num_key_value_heads, arch.head_dim, arch.vocab_size) == (
        2048,
        8,
        128,
        92553,
    )
    assert (arch.rms_norm_eps, arch.rope_theta, arch.max_position_embeddings) == (1e-5, 1e6, 32768)
    assert (arch.image_size, arch.image_seq_length, arch.dtype) == (448, 256, "bfloat16")
    assert arch.image_token_id is None and not arch.pixel_shuffle_v1 and not arch.vision_final_norm
    assert (arch.vision_num_hidden_layers, arch.vision_attention_bias, arch.vision_use_qk_norm) == (
        24,
        True,
        False,
    )


def test_qwen3_and_internvit_6b_are_detected():
    arch = InternVLArch.from_config_dict(opengvlab_config(QWEN3_8B, INTERNVIT_6B, template="internvl2_5"))
    assert (arch.text_family, arch.head_dim, arch.num_attention_heads * arch.head_dim) == ("qwen3", 128, 4096)
    assert (arch.vision_norm_type, arch.vision_use_qk_norm, arch.vision_attention_bias) == (
        "rms_norm",
        True,
        False,
    )
    assert arch.vision_num_hidden_layers == 45 and arch.template == "internvl2_5"


def test_phi3_is_served_within_its_original_context():
    """InternVL2-4B's Phi-3: LongRoPE's short factors and attention factor, the context bound to
    the original 4,096 tokens (where transformers takes the short factors), and a sliding window
    narrower than that bounds it too."""
    arch = InternVLArch.from_config_dict(opengvlab_config(PHI3_MINI_128K, template="phi3-chat"))
    assert (arch.text_family, arch.head_dim, arch.max_position_embeddings) == ("phi3", 96, 4096)
    assert arch.rope_short_factor == (1.05,) * 48
    assert arch.rope_attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    window = PHI3_MINI_128K | {"sliding_window": 2047, "rope_scaling": None}  # Phi-3-mini-4k's
    arch = InternVLArch.from_config_dict(opengvlab_config(window))
    assert (arch.max_position_embeddings, arch.rope_short_factor, arch.rope_attention_factor) == (
        2047,
        None,
        1.0,
    )


@pytest.mark.parametrize(
    ("top", "layers"), [({"select_layer": -1}, 24), ({"select_layer": -4}, 21), ({"select_layer": 6}, 6)]
)
def test_select_layer_runs_only_the_layers_up_to_it(top, layers):
    assert InternVLArch.from_config_dict(opengvlab_config(QWEN3_8B, **top)).vision_num_hidden_layers == layers


def test_ps_version_v1_is_kept():
    assert InternVLArch.from_config_dict(opengvlab_config(QWEN3_8B, ps_version="v1")).pixel_shuffle_v1


@pytest.mark.parametrize(
    ("llm", "message"),
    [
        (PHI3_MINI_128K | {"partial_rotary_factor": 0.75}, "partial rotary"),  # Phi-4-mini's
        (PHI3_MINI_128K | {"original_max_position_embeddings": None}, "original_max_position_embeddings"),
        (
            PHI3_MINI_128K | {"rope_scaling": {"type": "su", "short_factor": [1.0] * 47}},
            "short_factor has 47",
        ),
        (QWEN3_8B | {"architectures": ["Qwen3MoeForCausalLM"]}, "'Qwen3MoeForCausalLM'"),
        (QWEN3_8B | {"architectures": ["GptOssForCausalLM"]}, "'GptOssForCausalLM'"),
        (INTERNLM2_1_8B | {"bias": True}, "bias=true"),
        (INTERNLM2_1_8B | {"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE scaling 'linear'"),
        (QWEN3_8B | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling 'yarn'"),
        (QWEN3_8B | {"use_sliding_window": True}, "sliding-window"),
    ],
)
def test_unsupported_backbones_are_refused_with_the_reason(llm, message):
    with pytest.raises(ValueError, match=message) as info:
        InternVLArch.from_config_dict(opengvlab_config(llm))
    if "unsupported language model" in message or "Moe" in message or "Oss" in message:
        assert SUPPORTED in str(info.value), "the refusal lists what vlmd serves"
        assert "\n" not in str(info.value)


def test_interpolated_position_embeddings_are_refused():
    with pytest.raises(ValueError, match="interpolating"):
        InternVLArch.from_config_dict(opengvlab_config(QWEN3_8B, force_image_size=224))


# --- layouts ------------------------------------------------------------------------------------


def packed_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int) -> torch.Tensor:
    """InternLM2's wqkv from q/k/v rows: per KV head, its query heads, then k, then v."""
    num_kv = k.shape[0] // head_dim
    group = q.shape[0] // head_dim // num_kv
    qs, ks, vs = (
        q.view(num_kv, group, head_dim, -1),
        k.view(num_kv, 1, head_dim, -1),
        v.view(num_kv, 1, head_dim, -1),
    )
    return torch.cat([qs, ks, vs], dim=1).reshape(-1, q.shape[1])


@pytest.mark.parametrize(("num_heads", "num_kv"), [(8, 2), (4, 4), (6, 1)])
def test_grouped_heads_give_every_rank_its_rows(num_heads, num_kv):
    d, hidden = 4, 3
    q = torch.arange(num_heads * d * hidden, dtype=torch.float32).view(-1, hidden)
    kv_rows = torch.arange(num_kv * d * hidden, dtype=torch.float32).view(-1, hidden)
    k, v = -1 - kv_rows, 1000 + kv_rows
    wqkv = packed_wqkv(q, k, v, d)
    group = num_heads // num_kv

    def take(rows: GroupedHeads, start: int, length: int) -> torch.Tensor:
        return torch.cat([wqkv[a : a + n] for a, n in rows.ranges(start, length)])

    for size in (1, 2, num_heads):
        if num_heads % size:
            continue
        share = num_heads * d // size
        for rank in range(size):
            got = take(GroupedHeads(d, group, queries=True), rank * share, share)
            assert torch.equal(got, q[rank * share : (rank + 1) * share])
    for j in range(num_kv):
        assert torch.equal(take(GroupedHeads(d, group, False, slot=group), j * d, d), k[j * d : (j + 1) * d])
        assert torch.equal(
            take(GroupedHeads(d, group, False, slot=group + 1), j * d, d), v[j * d : (j + 1) * d]
        )
    ranges = GroupedHeads(d, group, queries=True).ranges(0, num_heads * d)
    assert len(ranges) == num_kv, "the query rows of one KV head's block are read in one piece"


def test_layout_names_every_parameter_and_refuses_strangers():
    arch = InternVLArch.from_config_dict(opengvlab_config(INTERNLM2_1_8B | {"num_hidden_layers": 1}))
    keys = [
        "language_model.model.tok_embeddings.weight",
        "language_model.model.layers.0.attention.wqkv.weight",
        "language_model.model.layers.0.attention.wo.weight",
        "language_model.model.layers.0.feed_forward.w1.weight",
        "language_model.output.weight",
        "vision_model.encoder.layers.0.attn.qkv.weight",
        "vision_model.encoder.layers.23.ls1",
        "mlp1.3.bias",
    ]
    text = component_sources(arch, keys, LANGUAGE, "test")
    assert text["model.layers.0.self_attn.v_proj.weight"].key == keys[1]
    assert (
        text["model.layers.0.mlp.gate_proj.weight"].key == keys[3] and text["lm_head.weight"].key == keys[4]
    )
    vision = component_sources(arch, keys, VISION, "test")
    assert vision["vision_tower.encoder.layer.0.attention.k_proj.weight"].rows.ranges(0, 1024) == [
        (1024, 1024)
    ]
    assert vision["vision_tower.encoder.layer.23.lambda_1"].key == keys[6]
    assert vision["multi_modal_projector.linear_2.bias"].key == keys[7]
    with pytest.raises(LayoutError, match="language_model.model.layers.0.attention.rotary"):
        component_sources(arch, [*keys, "language_model.model.layers.0.attention.rotary"], LANGUAGE, "test")
    trimmed = InternVLArch.from_config_dict(opengvlab_config(INTERNLM2_1_8B, select_layer=-2))
    assert "vision_tower.encoder.layer.23.lambda_1" not in component_sources(trimmed, keys, VISION, "test")
