"""A tiny random-weight InternVL checkpoint in the HF-native layout, for tests and demos.

`write_demo_model(path)` writes everything a real InternVL3-hf repo has that vlmd reads:
config.json, model.safetensors, a byte-level BPE tokenizer (tokenizer.json +
tokenizer_config.json with the ChatML template), preprocessor_config.json and
generation_config.json. Output is a pure function of (seed, overrides).

The language model is Qwen2 (InternVL 2.5 / 3), Llama (the -hf conversions of InternLM2-backbone
models), Qwen3 (InternVL 3.5) or Phi-3 (InternVL2-4B), chosen by `text_config={"model_type": ...}`;
the tokenizer is the byte-level one or, with `tokenizer="sentencepiece"`, a SentencePiece-style
one as InternLM2-hf has (`"phi3"`: the same with Phi-3's chat tokens).
`vlmd.demo_opengvlab` rewrites such a directory in OpenGVLab's own published format.

The weights are not HF's default init: with std 0.02 everywhere a random model emits one token
forever and ignores its image. The stds below make the residual stream, attention and the
projected image rows all O(1), so greedy output wanders over the vocabulary (20-30 distinct
tokens in 32) and follows the image. Logits have std ~8, so the top-1 / top-2 gap of a greedy
step is typically ~1.5 and rarely under 0.01, against float32 differences of ~2e-5 between
implementations.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vlmd.demo_sp_tokenizer import PHI3_SENTENCEPIECE, SENTENCEPIECE
from vlmd.demo_tokenizer import BYTE_LEVEL, DemoTokenizer

# Init stds (see the module docstring for why they are this large).
EMBED_STD = 1.0  # token embeddings (and the tied LM head): logits have std ~ sqrt(hidden)
LM_HEAD_STD = 1.0  # untied LM head, same scale as the tied one
QK_GAIN = 2.0  # q/k projections at 2/sqrt(fan_in): attention that picks, not averages
BIAS_STD = 0.1
POS_EMBED_STD = 0.3  # vision positions: present, but smaller than the content signal
PATCH_GAIN = 2.0  # patch conv at 2/sqrt(3*14*14): pixels dominate the first residual stream
PROJECTOR_OUT_GAIN = 2.0  # image rows end up with a norm like a text embedding's
# Qwen3's per-head q/k RMSNorm gains, in [1, 3): after the norm q and k have unit RMS whatever the
# projections' scale, so these gains alone keep attention picking rather than averaging.
QK_NORM_GAIN = 2.0

# The tiny language model's sizes (all families but Qwen3, whose widths differ on purpose).
_TINY_TEXT: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
}
DEFAULT_TEXT_CONFIG: dict[str, Any] = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    # head_dim 64: the smallest FlashInfer serves, so the demo model exercises the GPU kernels too.
    **_TINY_TEXT,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    "use_sliding_window": False,
    "sliding_window": None,
    "attention_dropout": 0.0,
    "use_cache": True,
    "dtype": "float32",
}
LLAMA_TEXT_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,  # InternLM2's
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    "attention_bias": False,
    "mlp_bias": False,
    "pretraining_tp": 1,
    "attention_dropout": 0.0,
    "use_cache": True,
    "dtype": "float32",
}
QWEN3_TEXT_CONFIG: dict[str, Any] = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    # num_attention_heads * head_dim (256) != hidden_size (192), as in Qwen3-0.6B (16 x 128 vs 1024):
    # the attention's width and the residual stream's must not be confused anywhere.
    "hidden_size": 192,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    "attention_bias": False,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 2,
    "attention_dropout": 0.0,
    "use_cache": True,
    "dtype": "float32",
}
# Phi-3-mini-128k's shape of config (InternVL2-4B's language model), LongRoPE included: short
# factors that differ per frequency, long ones that differ from them, and an attention factor
# of sqrt(1 + ln 32 / ln 4096) from the 131072 / 4096 context ratio.
PHI3_TEXT_CONFIG: dict[str, Any] = {
    "model_type": "phi3",
    "architectures": ["Phi3ForCausalLM"],
    **_TINY_TEXT,
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0 + 0.1 * i for i in range(32)],
        "long_factor": [2.0 + 0.5 * i for i in range(32)],
        "original_max_position_embeddings": 4096,
    },
    "sliding_window": 262144,
    "pad_token_id": None,  # Phi3Config's default, 32000, is beyond the demo's vocabulary
    "attention_dropout": 0.0,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "use_cache": True,
    "dtype": "float32",
}
# text_config defaults by text_config.model_type (DEFAULT_TEXT_CONFIG is Qwen2's).
TEXT_CONFIGS = {
    "qwen2": DEFAULT_TEXT_CONFIG,
    "llama": LLAMA_TEXT_CONFIG,
    "qwen3": QWEN3_TEXT_CONFIG,
    "phi3": PHI3_TEXT_CONFIG,
}
TOKENIZERS: dict[str, DemoTokenizer] = {
    "byte_level": BYTE_LEVEL,
    "sentencepiece": SENTENCEPIECE,
    "phi3": PHI3_SENTENCEPIECE,
}
DEFAULT_VISION_CONFIG: dict[str, Any] = {
    "model_type": "internvl_vision",
    "architectures": ["InternVisionModel"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "hidden_act": "gelu",
    "image_size": [448, 448],
    "patch_size": [14, 14],
    "num_channels": 3,
    "norm_type": "layer_norm",
    "layer_norm_eps": 1e-6,
    "attention_bias": True,
    "use_qk_norm": False,
    "use_mean_pooling": True,
    "use_absolute_position_embeddings": True,
    "use_mask_token": False,
    "layer_scale_init_value": 0.1,
    "attention_dropout": 0.0,
    "hidden_dropout_prob": 0.0,
    "projection_dropout": 0.0,
    "dtype": "float32",
}
# Real models' sizes, with random weights: what benchmarks serve on a GPU.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {},
    "internvl3-8b": {  # InternViT-300M + Qwen2-7B
        "text_config": {
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "vocab_size": 151674,
            "max_position_embeddings": 32768,
            "max_window_layers": 28,
        },
        "vision_config": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
        },
        "dtype": "bfloat16",
        "num_shards": 4,
    },
}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

_LEGACY_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def write_demo_model(path: str | Path, seed: int = 0, **overrides: Any) -> None:
    """Write a tiny InternVL model directory at `path`.

    overrides:
      text_config / vision_config: dicts merged over the defaults (sizes, norm_type, ...);
        text_config's model_type ("qwen2", "llama", "qwen3" or "phi3") picks the defaults (TEXT_CONFIGS);
      tokenizer: "byte_level" (default), "sentencepiece" or "phi3" (TOKENIZERS);
      tie_word_embeddings: bool (default False);
      key_layout: "hub" (model.language_model.*, default) or "legacy" (language_model.model.*,
        what transformers 5 `save_pretrained` writes);
      num_shards: split the weights over this many files with an index (default 1);
      size: "tiny" (default) or a real model's sizes (SIZES), with random weights;
      weights_device: where the weights are drawn ("cpu", default; "cuda" for large sizes);
      dtype: the weights' dtype, written in config.json ("float32" by default);
      any other key is written at the top level of config.json.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    options = copy.deepcopy(SIZES[overrides.pop("size", "tiny")])
    for key, value in overrides.items():
        options[key] = {**options.get(key, {}), **value} if isinstance(value, dict) else value
    weights_device = options.pop("weights_device", "cpu")
    key_layout = options.pop("key_layout", "hub")
    num_shards = options.pop("num_shards", 1)
    kind_name = options.pop("tokenizer", "byte_level")
    if kind_name not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {sorted(TOKENIZERS)}, not {kind_name!r}")
    kind = TOKENIZERS[kind_name]
    tokenizer = kind.build()
    token_ids = {token: tokenizer.token_to_id(token) for token in kind.special_tokens}
    config = demo_config(tokenizer.get_vocab_size(), token_ids, options, kind)

    tokenizer.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", kind.tokenizer_config(token_ids, config))
    write_json(out / "config.json", config)
    write_json(out / "preprocessor_config.json", _preprocessor_config(config))
    write_json(out / "processor_config.json", {"image_seq_length": config["image_seq_length"]})
    write_json(out / "generation_config.json", kind.generation_config(token_ids))
    tensors = demo_weights(config, seed, weights_device)
    if key_layout == "legacy":
        tensors = {_legacy_key(key): value for key, value in tensors.items()}
    elif key_layout != "hub":
        raise ValueError(f"key_layout must be 'hub' or 'legacy', not {key_layout!r}")
    write_safetensors(out, tensors, num_shards)


def demo_config(
    vocab_size: int, token_ids: dict[str, int], options: dict[str, Any], kind: DemoTokenizer = BYTE_LEVEL
) -> dict[str, Any]:
    """config.json for the demo model, with `options` (see write_demo_model) applied; `kind` is
    the tokenizer whose `token_ids` these are."""
    options = dict(options)
    tie = options.pop("tie_word_embeddings", False)
    text_options = options.pop("text_config", {})
    family = text_options.get("model_type", "qwen2")
    if family not in TEXT_CONFIGS:
        raise ValueError(f"text_config.model_type must be one of {sorted(TEXT_CONFIGS)}, not {family!r}")
    text = {**copy.deepcopy(TEXT_CONFIGS[family]), "vocab_size": vocab_size, **text_options}
    text.update(
        tie_word_embeddings=tie,
        bos_token_id=token_ids[kind.bos_token],
        eos_token_id=token_ids[kind.eos_token],
    )
    vision = {**copy.deepcopy(DEFAULT_VISION_CONFIG), **options.pop("vision_config", {})}
    downsample_ratio = options.pop("downsample_ratio", 0.5)
    side = vision["image_size"][0] // vision["patch_size"][0]
    config = {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "downsample_ratio": downsample_ratio,
        "image_seq_length": round(side * downsample_ratio) ** 2,
        "image_token_id": token_ids["<IMG_CONTEXT>"],
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": tie,
        "dtype": "float32",
        "text_config": text,
        "vision_config": vision,
    }
    config.update(options)
    text["dtype"] = vision["dtype"] = config["dtype"]
    return config


def demo_weights(config: dict[str, Any], seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Weights of config.json's dtype in the hub key layout, drawn in a fixed order from one
    seeded generator on `device`."""
    init = _Init(seed, device, getattr(torch, config["dtype"]))
    tensors = _vision_weights(init, config["vision_config"], "model.vision_tower.")
    tensors |= _projector_weights(init, config, "model.multi_modal_projector.")
    tensors |= _text_weights(init, config["text_config"], "model.language_model.")
    if not config["tie_word_embeddings"]:
        text = config["text_config"]
        tensors["lm_head.weight"] = init.normal((text["vocab_size"], text["hidden_size"]), LM_HEAD_STD)
    return tensors


class _Init:
    """Seeded draws, contiguous on the host (what safetensors wants): float32 from the CPU's
    generator by default; a large model's are drawn on `device` and kept in `dtype`."""

    def __init__(self, seed: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.device, self.dtype = device, dtype

    def normal(self, shape: tuple[int, ...], std: float) -> torch.Tensor:
        return self._out(torch.randn(shape, generator=self.gen, device=self.device) * std)

    def uniform(self, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
        return self._out(low + (high - low) * torch.rand(shape, generator=self.gen, device=self.device))

    def signs(self, n: int) -> torch.Tensor:
        """n random +1 / -1, in the weights' dtype."""
        return self._out(torch.randint(0, 2, (n,), generator=self.gen, device=self.device) * 2 - 1)

    def _out(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.dtype).cpu()

    def linear(self, out_dim: int, in_dim: int, gain: float = 1.0) -> torch.Tensor:
        return self.normal((out_dim, in_dim), gain / math.sqrt(in_dim))

    def norm_weight(self, dim: int) -> torch.Tensor:
        """Norm gains in [0.5, 1.5): random so each channel matters differently."""
        return self._out(0.5 + torch.rand((dim,), generator=self.gen, device=self.device))


def _vision_weights(init: _Init, vision: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    hidden, inter = vision["hidden_size"], vision["intermediate_size"]
    patch, channels = vision["patch_size"][0], vision["num_channels"]
    num_positions = (vision["image_size"][0] // patch) ** 2 + 1
    emb = prefix + "embeddings."
    t = {
        emb + "cls_token": init.normal((1, 1, hidden), 1.0),
        emb + "position_embeddings": init.normal((1, num_positions, hidden), POS_EMBED_STD),
        emb + "patch_embeddings.projection.weight": init.normal(
            (hidden, channels, patch, patch), PATCH_GAIN / math.sqrt(channels * patch * patch)
        ),
        emb + "patch_embeddings.projection.bias": init.normal((hidden,), BIAS_STD),
    }
    for i in range(vision["num_hidden_layers"]):
        layer = f"{prefix}encoder.layer.{i}."
        for name, gain in (("q_proj", QK_GAIN), ("k_proj", QK_GAIN), ("v_proj", 1.0)):
            t[f"{layer}attention.{name}.weight"] = init.linear(hidden, hidden, gain)
            if vision["attention_bias"]:
                t[f"{layer}attention.{name}.bias"] = init.normal((hidden,), BIAS_STD)
        if vision["use_qk_norm"]:
            t[layer + "attention.q_norm.weight"] = init.norm_weight(hidden)
            t[layer + "attention.k_norm.weight"] = init.norm_weight(hidden)
        t[layer + "attention.projection_layer.weight"] = init.linear(hidden, hidden)
        t[layer + "attention.projection_layer.bias"] = init.normal((hidden,), BIAS_STD)
        t[layer + "mlp.fc1.weight"] = init.linear(inter, hidden)
        t[layer + "mlp.fc1.bias"] = init.normal((inter,), BIAS_STD)
        t[layer + "mlp.fc2.weight"] = init.linear(hidden, inter)
        t[layer + "mlp.fc2.bias"] = init.normal((hidden,), BIAS_STD)
        t |= _norm(init, layer + "layernorm_before.", hidden, vision["norm_type"])
        t |= _norm(init, layer + "layernorm_after.", hidden, vision["norm_type"])
        # Layer scale in [0.5, 1): the real model's 0.1 init would mute the blocks.
        t[layer + "lambda_1"] = init.uniform((hidden,), 0.5, 1.0)
        t[layer + "lambda_2"] = init.uniform((hidden,), 0.5, 1.0)
    if not vision["use_mean_pooling"]:
        t |= _norm(init, prefix + "layernorm.", hidden, "layer_norm")
    return t


def _projector_weights(init: _Init, config: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    width = config["vision_config"]["hidden_size"] * round(1 / config["downsample_ratio"]) ** 2
    hidden = config["text_config"]["hidden_size"]
    return _norm(init, prefix + "layer_norm.", width, "layer_norm") | {
        prefix + "linear_1.weight": init.linear(hidden, width),
        prefix + "linear_1.bias": init.normal((hidden,), BIAS_STD),
        prefix + "linear_2.weight": init.linear(hidden, hidden, PROJECTOR_OUT_GAIN),
        prefix + "linear_2.bias": init.normal((hidden,), BIAS_STD),
    }


def _text_weights(init: _Init, text: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    hidden, inter = text["hidden_size"], text["intermediate_size"]
    head_dim = text.get("head_dim") or hidden // text["num_attention_heads"]
    q_size, kv_size = text["num_attention_heads"] * head_dim, text["num_key_value_heads"] * head_dim
    # Of the three families only Qwen2 biases q/k/v, and only Qwen3 RMS-normalizes each q and k head.
    qkv_bias, qk_norm = text["model_type"] == "qwen2", text["model_type"] == "qwen3"
    t = {prefix + "embed_tokens.weight": init.normal((text["vocab_size"], hidden), EMBED_STD)}
    for i in range(text["num_hidden_layers"]):
        layer = f"{prefix}layers.{i}."
        for name, size, gain in (
            ("q_proj", q_size, QK_GAIN),
            ("k_proj", kv_size, QK_GAIN),
            ("v_proj", kv_size, 1.0),
        ):
            t[f"{layer}self_attn.{name}.weight"] = init.linear(size, hidden, gain)
            if qkv_bias:
                t[f"{layer}self_attn.{name}.bias"] = init.normal((size,), BIAS_STD)
        if qk_norm:
            t[layer + "self_attn.q_norm.weight"] = QK_NORM_GAIN * init.norm_weight(head_dim)
            t[layer + "self_attn.k_norm.weight"] = QK_NORM_GAIN * init.norm_weight(head_dim)
        t[layer + "self_attn.o_proj.weight"] = init.linear(hidden, q_size)
        t[layer + "mlp.gate_proj.weight"] = init.linear(inter, hidden)
        t[layer + "mlp.up_proj.weight"] = init.linear(inter, hidden)
        t[layer + "mlp.down_proj.weight"] = init.linear(hidden, inter)
        t[layer + "input_layernorm.weight"] = init.norm_weight(hidden)
        t[layer + "post_attention_layernorm.weight"] = init.norm_weight(hidden)
        if text["model_type"] == "phi3":  # its checkpoints pack q/k/v and gate/up, rows one after another
            names = [f"{layer}self_attn.{name}_proj.weight" for name in "qkv"]
            t[layer + "self_attn.qkv_proj.weight"] = torch.cat([t.pop(name) for name in names])
            names = [f"{layer}mlp.{name}_proj.weight" for name in ("gate", "up")]
            t[layer + "mlp.gate_up_proj.weight"] = torch.cat([t.pop(name) for name in names])
    # Random signs on the final norm: with tied embeddings the residual stream still holds the
    # current token's own embedding e, and a positive gain would make e.(g*e) ~ |e|^2 the top
    # logit every step (the model repeats its input token forever); zero-mean gains cancel it.
    signs = init.signs(hidden)
    t[prefix + "norm.weight"] = init.norm_weight(hidden) * signs
    return t


def _norm(init: _Init, prefix: str, dim: int, norm_type: str) -> dict[str, torch.Tensor]:
    out = {prefix + "weight": init.norm_weight(dim)}
    if norm_type == "layer_norm":
        out[prefix + "bias"] = init.normal((dim,), BIAS_STD)
    return out


def _legacy_key(key: str) -> str:
    for hub, legacy in _LEGACY_PREFIXES:
        if key.startswith(hub):
            return legacy + key[len(hub) :]
    raise AssertionError(f"no legacy name for {key}")


def _hub_key(key: str) -> str:
    for hub, legacy in _LEGACY_PREFIXES:
        if key.startswith(legacy):
            return hub + key[len(legacy) :]
    return key


def read_demo_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a model directory (one file, or shards with an index) under the hub keys,
    whichever key_layout it was written with."""
    model_dir = Path(path)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        names = ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for name in names:
        tensors |= load_file(model_dir / name)
    return {_hub_key(key): value for key, value in tensors.items()}


def write_safetensors(out: Path, tensors: dict[str, torch.Tensor], num_shards: int) -> None:
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if num_shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata=metadata)
        return
    keys = sorted(tensors)
    weight_map: dict[str, str] = {}
    for shard in range(num_shards):
        name = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {key: tensors[key] for key in keys[shard::num_shards]}
        save_file(part, str(out / name), metadata=metadata)
        weight_map |= dict.fromkeys(part, name)
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(
        out / "model.safetensors.index.json",
        {"metadata": {"total_size": total_size}, "weight_map": weight_map},
    )


def _preprocessor_config(config: dict[str, Any]) -> dict[str, Any]:
    size = config["vision_config"]["image_size"]
    return {
        "image_processor_type": "GotOcr2ImageProcessor",
        "processor_class": "InternVLProcessor",
        "crop_to_patches": True,
        "min_patches": 1,
        "max_patches": 12,
        "size": {"height": size[0], "width": size[1]},
        "do_resize": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
        "do_convert_rgb": True,
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
