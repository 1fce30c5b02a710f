"""The two config.json dialects of InternVL, read into `InternVLArch` fields.

OpenGVLab (`model_type` "internvl_chat", `InternVLChatModel`):
    llm_config:    the language model's own config, architectures[0] naming its family
    vision_config: InternViT's (`qkv_bias`, `qk_normalization`, `norm_type`, ...)
    top level:     force_image_size, downsample_ratio, ps_version, select_layer, template,
                   and the tiling settings `vlmd.image` reads (dynamic_image_size, ...)
transformers (`model_type` "internvl", `InternVLForConditionalGeneration`):
    text_config:   model_type qwen2 / llama / qwen3
    vision_config: model_type internvl_vision (`attention_bias`, `use_qk_norm`, ...)
    top level:     downsample_ratio, image_token_id, vision_feature_layer, ...

Whatever vlmd cannot run exactly as transformers would is refused here, with the reason.
Torch-free, like `vlmd.models.config`.
"""

from __future__ import annotations

import math
from typing import Any

from vlmd.models.config import (
    HF_NATIVE,
    HF_TEXT_MODEL_TYPES,
    OPENGVLAB,
    TEXT_FAMILIES,
    UnsupportedModel,
)

# Rotary variants that equal plain RoPE within max_position_embeddings, which bounds vlmd's context:
# dynamic NTK scaling changes the frequencies only for sequences longer than that (transformers
# and InternLM2's own code alike), so up to it the result is plain RoPE, bit for bit.
PLAIN_WITHIN_CONTEXT_ROPE = ("default", "dynamic")
# LongRoPE, under its two names (Phi-3's first configs say "su"); see `_longrope_fields`.
LONGROPE = ("longrope", "su")


def arch_fields(config: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """`InternVLArch` keyword arguments from a config.json, and the image_seq_length it declares
    (None where it declares none), or UnsupportedModel / ValueError saying why not."""
    model_type = config.get("model_type")
    if model_type == "internvl_chat":
        return _opengvlab_fields(config), None
    if model_type == "internvl":
        return _hf_fields(config), config.get("image_seq_length")
    raise UnsupportedModel(f"unsupported model_type {model_type!r}")


def _opengvlab_fields(config: dict[str, Any]) -> dict[str, Any]:
    text, vision = _section(config, "llm_config"), _section(config, "vision_config")
    architectures = text.get("architectures") or [None]
    family = TEXT_FAMILIES.get(architectures[0])
    if family is None:
        raise UnsupportedModel(f"unsupported language model {architectures[0]!r} in llm_config")
    image_size = _square(config.get("force_image_size") or vision.get("image_size", 448), "image_size")
    if _square(vision.get("image_size", image_size), "image_size") != image_size:
        raise ValueError(
            f"force_image_size={image_size} differs from vision_config.image_size: InternViT's position "
            "embeddings would need interpolating, which vlmd does not do"
        )
    _expect(vision.get("hidden_act", "gelu"), "gelu", "vision_config.hidden_act")
    return {
        **_text_fields(family, text),
        **_vision_fields(
            vision,
            image_size=image_size,
            attention_bias=bool(vision.get("qkv_bias", True)),
            use_qk_norm=bool(vision.get("qk_normalization", False)),
            final_norm=False,  # OpenGVLab's InternVisionModel ends with its last layer
            feature_layer=config.get("select_layer", -1),
        ),
        **_glue_fields(config, image_size),
        "pixel_shuffle_v1": config.get("ps_version", "v1") == "v1",
        "image_token_id": None,  # <IMG_CONTEXT> is found by name in the tokenizer
        "dtype": _dtype_name(config, text),
        "layout": OPENGVLAB,
        "template": config.get("template"),
        # OpenGVLab's InternVLChatConfig unties the head whatever llm_config says; the loader
        # still ties when the checkpoint holds no head.
        "tie_word_embeddings": False,
    }


def _hf_fields(config: dict[str, Any]) -> dict[str, Any]:
    architectures = config.get("architectures") or ["InternVLForConditionalGeneration"]
    if "InternVLForConditionalGeneration" not in architectures:
        raise UnsupportedModel(f"unsupported architectures {architectures}")
    text, vision = _section(config, "text_config"), config.get("vision_config") or {}
    family = HF_TEXT_MODEL_TYPES.get(text.get("model_type"))
    if family is None:
        raise UnsupportedModel(f"unsupported language model {text.get('model_type')!r} in text_config")
    if vision.get("model_type", "internvl_vision") != "internvl_vision":
        raise UnsupportedModel(f"unsupported vision model {vision.get('model_type')!r}")
    _expect(vision.get("hidden_act", "gelu"), "gelu", "vision_config.hidden_act")
    _expect(config.get("projector_hidden_act", "gelu"), "gelu", "projector_hidden_act")
    _expect(
        config.get("vision_feature_select_strategy", "default"), "default", "vision_feature_select_strategy"
    )
    image_size = _square(vision.get("image_size", 448), "image_size")
    return {
        **_text_fields(family, text),
        **_vision_fields(
            vision,
            image_size=image_size,
            attention_bias=bool(vision.get("attention_bias", False)),
            use_qk_norm=bool(vision.get("use_qk_norm", False)),
            final_norm=not vision.get("use_mean_pooling", True),
            feature_layer=config.get("vision_feature_layer", -1),
        ),
        **_glue_fields(config, image_size),
        "pixel_shuffle_v1": False,
        "image_token_id": config.get("image_token_id", 151667),
        "dtype": _dtype_name(config, text),
        "layout": HF_NATIVE,
        "tie_word_embeddings": _tie_word_embeddings(config),
    }


def _text_fields(family: str, text: dict[str, Any]) -> dict[str, Any]:
    _check_text(family, text)
    hidden_size = text["hidden_size"]
    num_attention_heads = text["num_attention_heads"]
    context = text.get("max_position_embeddings", 32768)
    if family == "phi3" and text.get("sliding_window"):
        # Phi-3's attention sees the last sliding_window tokens: within them, all of them.
        context = min(context, int(text["sliding_window"]))
    fields = {
        "text_family": family,
        "hidden_size": hidden_size,
        "num_hidden_layers": text["num_hidden_layers"],
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": text.get("num_key_value_heads") or num_attention_heads,
        "head_dim": text.get("head_dim") or hidden_size // num_attention_heads,
        "intermediate_size": text["intermediate_size"],
        "vocab_size": text["vocab_size"],
        "rms_norm_eps": float(text.get("rms_norm_eps", 1e-6)),
        "rope_theta": _rope_theta(text),
        "max_position_embeddings": context,
    }
    rope = _rope_parameters(text)
    if _rope_type(rope) in LONGROPE:
        fields |= _longrope_fields(text, rope, context)
    return fields


def _longrope_fields(text: dict[str, Any], rope: dict[str, Any], context: int) -> dict[str, Any]:
    """LongRoPE within the original context: transformers (and Phi-3's own code) take the short
    factors while the sequence is at most original_max_position_embeddings long, the long ones
    beyond, for the whole sequence at once. vlmd serves the original context, where the short
    factors alone apply; the attention factor scales cos and sin either way."""
    original = rope.get("original_max_position_embeddings") or text.get("original_max_position_embeddings")
    if not original:
        raise ValueError("LongRoPE scaling needs original_max_position_embeddings")
    short = rope.get("short_factor")
    if not isinstance(short, list) or not all(isinstance(f, int | float) for f in short):
        raise ValueError("LongRoPE scaling needs a list of numbers as short_factor")
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        factor = rope.get("factor") or text.get("max_position_embeddings", original) / original
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {
        "max_position_embeddings": min(context, int(original)),
        "rope_short_factor": tuple(float(f) for f in short),
        "rope_attention_factor": float(attention_factor),
    }


def _check_text(family: str, text: dict[str, Any]) -> None:
    """Refuse the options of a family that vlmd's decoder does not implement."""
    _expect(text.get("hidden_act", "silu"), "silu", "the language model's hidden_act")
    # Biases beyond Qwen2's q/k/v: InternLM2 calls the switch `bias`, Llama and Qwen3 `attention_bias`.
    for key in ("bias", "attention_bias", "mlp_bias"):
        if text.get(key):
            raise ValueError(f"{family}: {key}=true (biased projections) is not supported")
    if text.get("use_sliding_window", False):
        raise ValueError(f"{family}: sliding-window attention (use_sliding_window=true) is not supported")
    rope_type = _rope_type(_rope_parameters(text))
    if rope_type not in PLAIN_WITHIN_CONTEXT_ROPE + LONGROPE:
        raise ValueError(
            f"RoPE scaling {rope_type!r} is not supported; vlmd runs plain, dynamic NTK and LongRoPE "
            "(within the original context) RoPE"
        )
    if (
        text.get("partial_rotary_factor", 1.0) != 1.0
        or _rope_parameters(text).get("partial_rotary_factor", 1.0) != 1.0
    ):
        raise ValueError("partial rotary embeddings are not supported")


def _vision_fields(
    vision: dict[str, Any],
    *,
    image_size: int,
    attention_bias: bool,
    use_qk_norm: bool,
    final_norm: bool,
    feature_layer: int,
) -> dict[str, Any]:
    num_layers = vision.get("num_hidden_layers", 24)
    # The rows the projector reads are hidden_states[feature_layer] (index 0: the embeddings),
    # so the layers after it never need to run (and their final norm does not apply).
    if feature_layer != -1:
        index = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
        if not 1 <= index <= num_layers:
            raise ValueError(f"vision feature layer {feature_layer} is outside the ViT's {num_layers} layers")
        num_layers, final_norm = index, False
    return {
        "vision_hidden_size": vision.get("hidden_size", 1024),
        "vision_num_hidden_layers": num_layers,
        "vision_num_attention_heads": vision.get("num_attention_heads", 16),
        "vision_intermediate_size": vision.get("intermediate_size", 4096),
        "vision_norm_type": vision.get("norm_type", "layer_norm"),
        "vision_layer_norm_eps": float(vision.get("layer_norm_eps", 1e-6)),
        "vision_use_qk_norm": use_qk_norm,
        "vision_attention_bias": attention_bias,
        "vision_final_norm": final_norm,
        "vision_use_absolute_position_embeddings": bool(vision.get("use_absolute_position_embeddings", True)),
        "num_channels": vision.get("num_channels", 3),
        "image_size": image_size,
        "patch_size": _square(vision.get("patch_size", 14), "patch_size"),
    }


def _glue_fields(config: dict[str, Any], image_size: int) -> dict[str, Any]:
    patch_size = _square((config.get("vision_config") or {}).get("patch_size", 14), "patch_size")
    downsample_ratio = float(config.get("downsample_ratio", 0.5))
    return {
        "downsample_ratio": downsample_ratio,
        "image_seq_length": _image_seq_length(image_size, patch_size, downsample_ratio),
    }


def _section(config: dict[str, Any], key: str) -> dict[str, Any]:
    section = config.get(key)
    if not isinstance(section, dict):
        raise ValueError(f"config.json has no {key}")
    return section


def _expect(value: Any, wanted: Any, name: str) -> None:
    if value != wanted:
        raise ValueError(f"unsupported {name}={value!r}: vlmd only implements {wanted!r}")


def _square(value: int | list[int], name: str) -> int:
    """HF writes image_size/patch_size as an int or an [h, w] pair; vlmd needs square tiles."""
    if isinstance(value, int):
        return value
    if len(value) != 2 or value[0] != value[1]:
        raise ValueError(f"vision_config.{name}={value} is not square")
    return int(value[0])


def _image_seq_length(image_size: int, patch_size: int, downsample_ratio: float) -> int:
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
    scale = round(1 / downsample_ratio)
    if abs(scale * downsample_ratio - 1) > 1e-6:
        raise ValueError(f"downsample_ratio={downsample_ratio} is not 1/n for an integer n")
    side = image_size // patch_size
    if side % scale:
        raise ValueError(f"a {side}x{side} patch grid cannot be pixel-shuffled by {downsample_ratio}")
    return (side // scale) ** 2


def _rope_parameters(text: dict[str, Any]) -> dict[str, Any]:
    return text.get("rope_parameters") or text.get("rope_scaling") or {}


def _rope_type(rope: dict[str, Any]) -> str:
    return rope.get("rope_type", rope.get("type", "default"))


def _rope_theta(text: dict[str, Any]) -> float:
    """transformers 5 writes rope_parameters.rope_theta; older configs a top-level rope_theta."""
    params = text.get("rope_parameters") or {}
    return float(params.get("rope_theta", text.get("rope_theta", 10000.0)))


def _tie_word_embeddings(config: dict[str, Any]) -> bool:
    """The top-level flag wins, as in transformers; else the language model's own flag."""
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    return bool(config["text_config"].get("tie_word_embeddings", False))


def _dtype_name(config: dict[str, Any], text: dict[str, Any]) -> str:
    for source in (config, text):
        for key in ("dtype", "torch_dtype"):
            if isinstance(source.get(key), str):
                return source[key]
    return "float32"
