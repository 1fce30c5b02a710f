"""The architecture of an InternVL-hf checkpoint, parsed once from its config.json.

This module imports no torch: the scheduler, the KV allocator and the HTTP front end size
themselves from `InternVLArch` without paying for a torch import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURE = "InternVLForConditionalGeneration"
SUPPORTED_TEXT_MODEL_TYPES = ("qwen2",)


@dataclass(frozen=True)
class InternVLArch:
    """Everything vlmd needs to know about an InternVL (InternViT + MLP projector + Qwen2) model.

    Field names follow the HF config keys; vision fields carry a `vision_` prefix. Values are
    validated on construction by `from_config_dict`, so holders may trust them.
    """

    # Language model (Qwen2).
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    # Vision tower (InternViT).
    vision_hidden_size: int
    vision_num_hidden_layers: int
    vision_num_attention_heads: int
    vision_intermediate_size: int
    vision_norm_type: str  # "layer_norm" or "rms_norm"
    vision_layer_norm_eps: float
    vision_use_qk_norm: bool
    vision_attention_bias: bool
    vision_use_mean_pooling: bool  # False: a final LayerNorm runs after the encoder
    vision_use_absolute_position_embeddings: bool
    num_channels: int
    image_size: int  # side of one square tile, in pixels
    patch_size: int
    # Glue between the two.
    downsample_ratio: float
    image_seq_length: int  # LM tokens per tile, after pixel shuffle
    image_token_id: int
    dtype: str  # the checkpoint's torch dtype name, e.g. "bfloat16"

    @property
    def vision_head_dim(self) -> int:
        return self.vision_hidden_size // self.vision_num_attention_heads

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def projector_input_size(self) -> int:
        """Width of a pixel-shuffled vision token: (1 / downsample_ratio)^2 patches side by side."""
        return self.vision_hidden_size * round(1 / self.downsample_ratio) ** 2

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> InternVLArch:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"{model_dir}: no config.json, not a model directory")
        with open(path, encoding="utf-8") as f:
            return cls.from_config_dict(json.load(f))

    @classmethod
    def from_config_dict(cls, config: dict[str, Any]) -> InternVLArch:
        _check_supported(config)
        text, vision = config["text_config"], config.get("vision_config") or {}
        image_size = _square(vision.get("image_size", 448), "image_size")
        patch_size = _square(vision.get("patch_size", 14), "patch_size")
        downsample_ratio = float(config.get("downsample_ratio", 0.5))
        hidden_size = text["hidden_size"]
        num_attention_heads = text["num_attention_heads"]
        arch = cls(
            hidden_size=hidden_size,
            num_hidden_layers=text["num_hidden_layers"],
            num_attention_heads=num_attention_heads,
            num_key_value_heads=text.get("num_key_value_heads") or num_attention_heads,
            head_dim=text.get("head_dim") or hidden_size // num_attention_heads,
            intermediate_size=text["intermediate_size"],
            vocab_size=text["vocab_size"],
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(text),
            max_position_embeddings=text.get("max_position_embeddings", 32768),
            tie_word_embeddings=_tie_word_embeddings(config),
            vision_hidden_size=vision.get("hidden_size", 1024),
            vision_num_hidden_layers=vision.get("num_hidden_layers", 24),
            vision_num_attention_heads=vision.get("num_attention_heads", 16),
            vision_intermediate_size=vision.get("intermediate_size", 4096),
            vision_norm_type=vision.get("norm_type", "layer_norm"),
            vision_layer_norm_eps=float(vision.get("layer_norm_eps", 1e-6)),
            vision_use_qk_norm=bool(vision.get("use_qk_norm", False)),
            vision_attention_bias=bool(vision.get("attention_bias", False)),
            vision_use_mean_pooling=bool(vision.get("use_mean_pooling", True)),
            vision_use_absolute_position_embeddings=bool(
                vision.get("use_absolute_position_embeddings", True)
            ),
            num_channels=vision.get("num_channels", 3),
            image_size=image_size,
            patch_size=patch_size,
            downsample_ratio=downsample_ratio,
            image_seq_length=_image_seq_length(image_size, patch_size, downsample_ratio),
            image_token_id=config.get("image_token_id", 151667),
            dtype=_dtype_name(config),
        )
        arch.check_integrity(config.get("image_seq_length"))
        return arch

    def tensor_parallel_error(self, tp: int) -> str | None:
        """Why the language model cannot be split over `tp` ranks, or None if it can."""
        for name in ("num_attention_heads", "intermediate_size"):
            if getattr(self, name) % tp:
                return f"the model's {name} ({getattr(self, name)}) is not divisible by {tp}"
        kv = self.num_key_value_heads
        if kv % tp and tp % kv:
            return f"{kv} KV heads can be neither split over nor replicated evenly on {tp} ranks"
        return None

    def vision_tensor_parallel_error(self, tp: int) -> str | None:
        """Why the ViT cannot be split over `tp` ranks, or None if it can."""
        for name in ("vision_num_attention_heads", "vision_intermediate_size"):
            if getattr(self, name) % tp:
                return f"the model's {name} ({getattr(self, name)}) is not divisible by {tp}"
        return None

    def check_integrity(self, declared_image_seq_length: int | None = None) -> None:
        """Raise ValueError when the numbers cannot describe a model vlmd can run."""
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.vision_hidden_size % self.vision_num_attention_heads:
            raise ValueError("vision hidden_size must be a multiple of vision num_attention_heads")
        if self.vision_norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"unsupported vision norm_type {self.vision_norm_type!r}")
        if declared_image_seq_length is not None and declared_image_seq_length != self.image_seq_length:
            raise ValueError(
                f"config.json says image_seq_length={declared_image_seq_length} but image_size="
                f"{self.image_size}, patch_size={self.patch_size} and downsample_ratio="
                f"{self.downsample_ratio} give {self.image_seq_length}"
            )
        if not 0 <= self.image_token_id < self.vocab_size:
            raise ValueError(f"image_token_id={self.image_token_id} is outside the vocabulary")


def _check_supported(config: dict[str, Any]) -> None:
    """Reject, with the reason, every config whose model vlmd would silently run wrong."""
    model_type = config.get("model_type")
    if model_type == "internvl_chat":
        raise ValueError(
            "model_type 'internvl_chat' is the original remote-code InternVL checkpoint; "
            "vlmd loads the transformers-native conversion (the '-hf' repos, model_type 'internvl')"
        )
    if model_type != "internvl":
        raise ValueError(f"unsupported model_type {model_type!r}: vlmd only serves 'internvl' models")
    architectures = config.get("architectures") or [SUPPORTED_ARCHITECTURE]
    if SUPPORTED_ARCHITECTURE not in architectures:
        raise ValueError(f"unsupported architectures {architectures}: expected [{SUPPORTED_ARCHITECTURE!r}]")
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise ValueError("config.json has no text_config")
    if text.get("model_type") not in SUPPORTED_TEXT_MODEL_TYPES:
        raise ValueError(
            f"unsupported language model {text.get('model_type')!r}: vlmd supports {SUPPORTED_TEXT_MODEL_TYPES}"
        )
    vision = config.get("vision_config") or {}
    if vision.get("model_type", "internvl_vision") != "internvl_vision":
        raise ValueError(f"unsupported vision model {vision.get('model_type')!r}: expected 'internvl_vision'")
    _expect(text.get("hidden_act", "silu"), "silu", "text_config.hidden_act")
    _expect(vision.get("hidden_act", "gelu"), "gelu", "vision_config.hidden_act")
    _expect(config.get("projector_hidden_act", "gelu"), "gelu", "projector_hidden_act")
    _expect(config.get("vision_feature_layer", -1), -1, "vision_feature_layer")
    _expect(
        config.get("vision_feature_select_strategy", "default"), "default", "vision_feature_select_strategy"
    )
    if text.get("use_sliding_window", False):
        raise ValueError("Qwen2 sliding-window attention (use_sliding_window=true) is not supported")
    rope_type = (text.get("rope_parameters") or {}).get("rope_type", "default")
    if rope_type != "default" or text.get("rope_scaling"):
        raise ValueError(f"RoPE scaling ({rope_type!r}) is not supported; only plain RoPE is")


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


def _rope_theta(text: dict[str, Any]) -> float:
    """transformers 5 writes rope_parameters.rope_theta; older configs a top-level rope_theta."""
    params = text.get("rope_parameters") or {}
    return float(params.get("rope_theta", text.get("rope_theta", 10000.0)))


def _tie_word_embeddings(config: dict[str, Any]) -> bool:
    """The top-level flag wins, as in transformers; else the language model's own flag."""
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    return bool(config["text_config"].get("tie_word_embeddings", False))


def _dtype_name(config: dict[str, Any]) -> str:
    for source in (config, config["text_config"]):
        for key in ("dtype", "torch_dtype"):
            if isinstance(source.get(key), str):
                return source[key]
    return "float32"
