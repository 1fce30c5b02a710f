"""The demo model in OpenGVLab's own published format ("internvl_chat"), for tests and demos.

`write_opengvlab_model(hf_dir, out_dir, backbone)` rewrites a tiny HF-native directory (written by
`vlmd.demo.write_demo_model`) the way OpenGVLab publishes InternVL 2 / 2.5 / 3 / 3.5: the inverse
of transformers' `convert_internvl_weights_to_hf.py`, so that transformers on `hf_dir` is the exact
reference for a server that loads `out_dir`. The weights are the same numbers under OpenGVLab's
keys (vision q/k/v fused into `attn.qkv`; for InternLM2, q/k/v grouped into `attention.wqkv`), the
config is OpenGVLab's dialect (`llm_config`, InternViT's `vision_config`, `template`), and the
tokenizer is the same tokenizer.json as OpenGVLab's repos declare it (InternLM2's as remote code).
No model code is written: vlmd never imports any.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from vlmd.demo import read_demo_weights, write_json, write_safetensors

BACKBONES = ("qwen2", "llama", "qwen3", "internlm2", "phi3")
# Per backbone: the HF demo's text_config.model_type and tokenizer (InternLM2's -hf conversion is a
# Llama with a SentencePiece-style tokenizer, as InternVL2_5-8B-MPO-hf is), the llm_config
# architecture, and the conversation template OpenGVLab's config.json names.
_HF_TEXT_FAMILY = {"qwen2": "qwen2", "llama": "llama", "qwen3": "qwen3", "internlm2": "llama", "phi3": "phi3"}
_HF_TOKENIZER = {
    "qwen2": "byte_level",
    "llama": "byte_level",
    "qwen3": "byte_level",
    "internlm2": "sentencepiece",
    "phi3": "phi3",
}
_HF_TOKENIZER_CLASS = {
    "byte_level": "Qwen2Tokenizer",
    "sentencepiece": "LlamaTokenizerFast",
    "phi3": "LlamaTokenizerFast",
}
_ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "internlm2": "InternLM2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
_DEFAULT_TEMPLATES = {
    "qwen2": "internvl2_5",
    "llama": "internvl2_5",
    "qwen3": "internvl2_5",
    "internlm2": "internlm2-chat",
    "phi3": "phi3-chat",
}
# generation_config.json's eos_token_id as OpenGVLab ships it: InternVL2-1B (Qwen2) has
# [<|im_start|>, <|im_end|>], InternVL2-2B (InternLM2) [<|im_end|>, <|im_start|>].
_GENERATION_EOS = {
    "qwen2": ("<|im_start|>", "<|im_end|>"),
    "llama": ("<|im_start|>", "<|im_end|>"),
    "qwen3": ("<|im_start|>", "<|im_end|>"),
    "internlm2": ("<|im_end|>", "<|im_start|>"),
    "phi3": ("</s>", "<|assistant|>", "<|end|>"),  # InternVL2-4B's: 32000, 32001, 32007
}

# InternVL3.5's style: list content, `<image>` + newline for an image part, no default system turn.
PARTS_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
# InternVL2-1B's style (Qwen2's ChatML): string content only, concatenated (a list content fails
# to render, as it does with the real one), and a default system turn.
STRING_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
CHAT_TEMPLATES = {"none": None, "parts": PARTS_CHAT_TEMPLATE, "string": STRING_CHAT_TEMPLATE}

# InternLM2 checkpoints ship their tokenizer as code. This stand-in (vlmd's own) only loads the
# tokenizer.json beside it, as is: a TokenizersBackend subclass without an __init__ of its own.
INTERNLM2_TOKENIZER_FILE = "tokenization_internlm2.py"
INTERNLM2_TOKENIZER_MODULE = '''"""vlmd's demo stand-in for InternLM2's remote-code tokenizer: the tokenizer.json beside this
file, loaded as is (written by vlmd.demo_opengvlab)."""

from transformers import PreTrainedTokenizerFast


class InternLM2Tokenizer(PreTrainedTokenizerFast):
    vocab_files_names = {"tokenizer_file": "tokenizer.json"}
    model_input_names = ["input_ids", "attention_mask"]
'''


def hf_demo_options(backbone: str) -> dict[str, Any]:
    """`write_demo_model` overrides for the HF-native model that `backbone` is converted from."""
    _check_choice(backbone, BACKBONES, "backbone")
    return {"text_config": {"model_type": _HF_TEXT_FAMILY[backbone]}, "tokenizer": _HF_TOKENIZER[backbone]}


def write_opengvlab_model(
    hf_dir: str | Path,
    out_dir: str | Path,
    backbone: str,
    *,
    num_shards: int = 1,
    chat_template: str = "none",
    generation_config: bool = True,
    template: str | None = None,
) -> None:
    """Write `hf_dir`'s model at `out_dir` in OpenGVLab's format with a `backbone` language model.

    `hf_dir` must be what `write_demo_model(..., **hf_demo_options(backbone))` writes (any seed,
    sizes, key_layout or sharding). chat_template: "none" (the tokenizer has none: the server must
    use the conversation template config.json names), "parts" or "string" (see CHAT_TEMPLATES);
    generation_config: write generation_config.json; template: config.json's conversation
    template (default: OpenGVLab's for the backbone).
    """
    hf, out = Path(hf_dir), Path(out_dir)
    _check_choice(backbone, BACKBONES, "backbone")
    _check_choice(chat_template, tuple(CHAT_TEMPLATES), "chat_template")
    config = json.loads((hf / "config.json").read_text())
    hf_tokenizer_config = json.loads((hf / "tokenizer_config.json").read_text())
    _check_source(config, hf_tokenizer_config, backbone)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", opengvlab_config(config, backbone, template))
    write_safetensors(out, opengvlab_weights(read_demo_weights(hf), config, backbone), num_shards)
    (out / "tokenizer.json").write_bytes((hf / "tokenizer.json").read_bytes())
    write_json(out / "tokenizer_config.json", _tokenizer_config(hf_tokenizer_config, backbone, chat_template))
    if backbone == "internlm2":
        (out / INTERNLM2_TOKENIZER_FILE).write_text(INTERNLM2_TOKENIZER_MODULE)
    if generation_config:
        tokenizer = Tokenizer.from_file(str(hf / "tokenizer.json"))
        eos = [tokenizer.token_to_id(token) for token in _GENERATION_EOS[backbone]]
        write_json(out / "generation_config.json", {"eos_token_id": eos})


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


def _check_source(config: dict[str, Any], tokenizer_config: dict[str, Any], backbone: str) -> None:
    """Refuse an HF directory that OpenGVLab's format cannot hold exactly."""
    text, vision = config["text_config"], config["vision_config"]
    if config.get("model_type") != "internvl" or text["model_type"] != _HF_TEXT_FAMILY[backbone]:
        raise ValueError(
            f"backbone {backbone!r} is converted from an HF-native {_HF_TEXT_FAMILY[backbone]} demo"
        )
    wanted = _HF_TOKENIZER_CLASS[_HF_TOKENIZER[backbone]]
    if tokenizer_config.get("tokenizer_class") != wanted:
        raise ValueError(
            f"backbone {backbone!r} needs the demo's {_HF_TOKENIZER[backbone]} tokenizer ({wanted})"
        )
    # OpenGVLab's InternVisionModel has no final norm and always absolute positions.
    if not vision.get("use_mean_pooling", True) or not vision.get("use_absolute_position_embeddings", True):
        raise ValueError(
            "OpenGVLab's InternViT has no final norm (use_mean_pooling) and absolute positions only"
        )
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    if backbone in ("qwen2", "internlm2") and head_dim * text["num_attention_heads"] != text["hidden_size"]:
        raise ValueError(f"{backbone}'s config has no head_dim: it needs heads * head_dim == hidden_size")


def opengvlab_config(config: dict[str, Any], backbone: str, template: str | None = None) -> dict[str, Any]:
    """OpenGVLab's config.json for the model an HF-native config.json describes."""
    vision = config["vision_config"]
    return {
        "architectures": ["InternVLChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "model_type": "internvl_chat",
        "template": template or _DEFAULT_TEMPLATES[backbone],
        "downsample_ratio": config["downsample_ratio"],
        "dynamic_image_size": True,
        "force_image_size": _side(vision["image_size"]),
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "use_thumbnail": True,
        "pad2square": False,
        "ps_version": "v2",  # transformers' pixel shuffle is OpenGVLab's v2
        "select_layer": config.get("vision_feature_layer", -1),
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "torch_dtype": "float32",
        "llm_config": _llm_config(config["text_config"], backbone),
        "vision_config": _vision_config(vision),
    }


def _llm_config(text: dict[str, Any], backbone: str) -> dict[str, Any]:
    """The language model's own config, with the keys of its family."""
    rope = dict(text.get("rope_parameters") or {})
    rope_theta = rope.pop("rope_theta", text.get("rope_theta", 10000.0))
    rope_type = rope.pop("rope_type", "default")
    rope_scaling = None if rope_type == "default" else {"type": rope_type, **rope}
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    llm = {  # the keys every family has
        "architectures": [_ARCHITECTURES[backbone]],
        "model_type": backbone,
        "hidden_size": text["hidden_size"],
        "intermediate_size": text["intermediate_size"],
        "num_hidden_layers": text["num_hidden_layers"],
        "num_attention_heads": text["num_attention_heads"],
        "num_key_value_heads": text["num_key_value_heads"],
        "hidden_act": text["hidden_act"],
        "max_position_embeddings": text["max_position_embeddings"],
        "rms_norm_eps": text["rms_norm_eps"],
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "vocab_size": text["vocab_size"],
        "bos_token_id": text["bos_token_id"],
        "eos_token_id": text["eos_token_id"],
        # InternVLChatConfig unties the head; the weights always hold one (tied demos get a copy).
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    return llm | _family_llm_keys(text, backbone, head_dim, rope_scaling)


def _family_llm_keys(
    text: dict[str, Any], backbone: str, head_dim: int, rope_scaling: dict[str, Any] | None
) -> dict[str, Any]:
    """The llm_config keys only one family has."""
    if backbone == "qwen2":
        return {
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": text["num_hidden_layers"],
        }
    if backbone == "llama":
        return {"head_dim": head_dim, "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    if backbone == "qwen3":
        return {
            "head_dim": head_dim,
            "attention_bias": False,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": text["num_hidden_layers"],
        }
    if backbone == "phi3":  # Phi-3-mini-128k's keys, as InternVL2-4B publishes them
        return {
            "original_max_position_embeddings": rope_scaling.pop("original_max_position_embeddings"),
            "rope_scaling": {**rope_scaling, "type": "su"},
            "sliding_window": text["sliding_window"],
            "attention_dropout": 0.0,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
            "pad_token_id": text["eos_token_id"],
        }
    return {  # internlm2
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        },
        "bias": False,
        "pad_token_id": text["eos_token_id"],
        # What InternLM2 checkpoints publish. Dynamic NTK changes the frequencies only past
        # max_position_embeddings, so within it this is the HF Llama's plain RoPE, bit for bit.
        "rope_scaling": rope_scaling or {"type": "dynamic", "factor": 2.0},
    }


def _vision_config(vision: dict[str, Any]) -> dict[str, Any]:
    """InternViT's own config keys for an HF InternVLVisionConfig."""
    return {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": vision["hidden_size"],
        "intermediate_size": vision["intermediate_size"],
        "num_attention_heads": vision["num_attention_heads"],
        "num_hidden_layers": vision["num_hidden_layers"],
        "image_size": _side(vision["image_size"]),
        "patch_size": _side(vision["patch_size"]),
        "num_channels": vision["num_channels"],
        "qkv_bias": vision["attention_bias"],
        "qk_normalization": vision["use_qk_norm"],
        "norm_type": vision["norm_type"],
        "layer_norm_eps": vision["layer_norm_eps"],
        "hidden_act": vision["hidden_act"],
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "drop_path_rate": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "use_flash_attn": False,
        "torch_dtype": "float32",
    }


def _side(size: int | list[int]) -> int:
    return size if isinstance(size, int) else size[0]


# --- weights -----------------------------------------------------------------------------------

_VIT = r"model\.vision_tower\.encoder\.layer\.(\d+)\."
_VIT_OUT = r"vision_model.encoder.layers.\1."
_LM = r"model\.language_model\.layers\.(\d+)\."
_LM_OUT = r"language_model.model.layers.\1."
# (hub key pattern, OpenGVLab key template): the one-to-one renames, inverse of the conversion's.
_VISION_RENAMES = (
    (r"model\.vision_tower\.embeddings\.cls_token", "vision_model.embeddings.class_embedding"),
    (r"model\.vision_tower\.embeddings\.position_embeddings", "vision_model.embeddings.position_embedding"),
    (
        r"model\.vision_tower\.embeddings\.patch_embeddings\.projection\.(weight|bias)",
        r"vision_model.embeddings.patch_embedding.\1",
    ),
    (_VIT + r"attention\.projection_layer\.(weight|bias)", _VIT_OUT + r"attn.proj.\2"),
    (_VIT + r"attention\.(q_norm|k_norm)\.weight", _VIT_OUT + r"attn.\2.weight"),
    (_VIT + r"lambda_(1|2)", _VIT_OUT + r"ls\2"),
    (_VIT + r"layernorm_before\.(weight|bias)", _VIT_OUT + r"norm1.\2"),
    (_VIT + r"layernorm_after\.(weight|bias)", _VIT_OUT + r"norm2.\2"),
    (_VIT + r"mlp\.(fc1|fc2)\.(weight|bias)", _VIT_OUT + r"mlp.\2.\3"),
    (r"model\.multi_modal_projector\.layer_norm\.(weight|bias)", r"mlp1.0.\1"),
    (r"model\.multi_modal_projector\.linear_1\.(weight|bias)", r"mlp1.1.\1"),
    (r"model\.multi_modal_projector\.linear_2\.(weight|bias)", r"mlp1.3.\1"),
)
_TEXT_RENAMES = (
    (r"model\.language_model\.(.+)", r"language_model.model.\1"),
    (r"lm_head\.weight", "language_model.lm_head.weight"),
)
_INTERNLM2_RENAMES = (
    (r"model\.language_model\.embed_tokens\.weight", "language_model.model.tok_embeddings.weight"),
    (_LM + r"self_attn\.o_proj\.weight", _LM_OUT + "attention.wo.weight"),
    (_LM + r"mlp\.gate_proj\.weight", _LM_OUT + "feed_forward.w1.weight"),
    (_LM + r"mlp\.up_proj\.weight", _LM_OUT + "feed_forward.w3.weight"),
    (_LM + r"mlp\.down_proj\.weight", _LM_OUT + "feed_forward.w2.weight"),
    (_LM + r"input_layernorm\.weight", _LM_OUT + "attention_norm.weight"),
    (_LM + r"post_attention_layernorm\.weight", _LM_OUT + "ffn_norm.weight"),
    (r"model\.language_model\.norm\.weight", "language_model.model.norm.weight"),
    (r"lm_head\.weight", "language_model.output.weight"),
)
_VIT_Q = re.compile(_VIT + r"attention\.q_proj\.(weight|bias)")
_LM_Q = re.compile(_LM + r"self_attn\.q_proj\.weight")


def opengvlab_weights(
    tensors: dict[str, torch.Tensor], config: dict[str, Any], backbone: str
) -> dict[str, torch.Tensor]:
    """The HF-native `tensors` (hub keys) under OpenGVLab's keys, packed where OpenGVLab packs."""
    tensors = dict(tensors)
    if "lm_head.weight" not in tensors:  # tied: OpenGVLab's checkpoints always hold the head
        tensors["lm_head.weight"] = tensors["model.language_model.embed_tokens.weight"].clone()
    out = _fused_vision_qkv(tensors)
    if backbone == "internlm2":
        out |= _grouped_wqkv(tensors, config["text_config"])
        renames = _VISION_RENAMES + _INTERNLM2_RENAMES
    else:
        renames = _VISION_RENAMES + _TEXT_RENAMES
    for key, value in tensors.items():
        out[_rename(key, renames)] = value
    return out


def _rename(key: str, renames: tuple[tuple[str, str], ...]) -> str:
    for pattern, template in renames:
        if (match := re.fullmatch(pattern, key)) is not None:
            return match.expand(template)
    raise ValueError(f"{key} has no place in OpenGVLab's layout")


def _fused_vision_qkv(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pops each ViT layer's q/k/v projections and returns them fused as InternViT's attn.qkv:
    the q rows, then k's, then v's."""
    out = {}
    for key in [key for key in tensors if _VIT_Q.fullmatch(key)]:
        parts = [tensors.pop(key.replace("q_proj", name)) for name in ("q_proj", "k_proj", "v_proj")]
        out[_VIT_Q.sub(_VIT_OUT + r"attn.qkv.\2", key)] = torch.cat(parts)  # [3 * hidden(, hidden)]
    return out


def _grouped_wqkv(tensors: dict[str, torch.Tensor], text: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Pops each layer's q/k/v projections and returns them as InternLM2's attention.wqkv: for each
    KV head j, the rows of its query heads, then k_j, then v_j, head_dim rows each (what the
    conversion's `rearrange(wqkv, "(h gs d) z -> h gs d z", gs=2 + groups, d=head_dim)` splits)."""
    num_kv_heads, hidden = text["num_key_value_heads"], text["hidden_size"]
    head_dim = hidden // text["num_attention_heads"]
    group = text["num_attention_heads"] // num_kv_heads
    out = {}
    for key in [key for key in tensors if _LM_Q.fullmatch(key)]:
        q = tensors.pop(key).reshape(
            num_kv_heads, group, head_dim, hidden
        )  # [kv_heads, group, head_dim, hidden]
        k = tensors.pop(key.replace("q_proj", "k_proj")).reshape(num_kv_heads, 1, head_dim, hidden)
        v = tensors.pop(key.replace("q_proj", "v_proj")).reshape(num_kv_heads, 1, head_dim, hidden)
        wqkv = torch.cat([q, k, v], dim=1)  # [kv_heads, group + 2, head_dim, hidden]
        out[_LM_Q.sub(_LM_OUT + "attention.wqkv.weight", key)] = wqkv.reshape(-1, hidden)
    return out


# --- tokenizer ---------------------------------------------------------------------------------


def _tokenizer_config(hf_config: dict[str, Any], backbone: str, chat_template: str) -> dict[str, Any]:
    """The HF demo's tokenizer_config.json as OpenGVLab's repos declare the same tokenizer: Qwen2's
    class for the Qwen-tokenized backbones, InternLM2's remote code for InternLM2; the special
    tokens as a list (the -hf repos' named image tokens are theirs)."""
    dropped = ("extra_special_tokens", "chat_template", "add_prefix_space", "legacy")
    config = {key: value for key, value in hf_config.items() if key not in dropped}
    named = {config.get(key) for key in ("bos_token", "eos_token", "pad_token", "unk_token")}
    config["additional_special_tokens"] = [
        added["content"]
        for added in hf_config["added_tokens_decoder"].values()
        if added["content"] not in named
    ]
    if backbone == "internlm2":
        config["tokenizer_class"] = "InternLM2Tokenizer"
        config["auto_map"] = {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}
    elif backbone == "phi3":
        config["tokenizer_class"] = "LlamaTokenizer"  # InternVL2-4B's (Phi-3's SentencePiece)
    else:
        config["tokenizer_class"] = "Qwen2Tokenizer"
    if CHAT_TEMPLATES[chat_template] is not None:
        config["chat_template"] = CHAT_TEMPLATES[chat_template]
    return config
