"""The architecture of an InternVL checkpoint, parsed once from its config.json alone.

Two dialects of config.json describe the same models (`vlmd.models.formats` reads both):

- OpenGVLab's remote-code format (`"model_type": "internvl_chat"`, `llm_config` and
  `vision_config` inside), in which InternVL 2 / 2.5 / 3 / 3.5 are published;
- transformers' native format (`"model_type": "internvl"`, `text_config`), the `-hf` repos.

Either becomes one `InternVLArch`: pure data, validated on construction. This module imports no
torch: the scheduler, the KV allocator and the HTTP front end size themselves from it without
paying for a torch import. No code from the model directory is ever imported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OPENGVLAB, HF_NATIVE = "opengvlab", "hf"


# The language-model families vlmd runs (one model file each in vlmd/models/), by the
# architecture name OpenGVLab's `llm_config` gives. InternLM2 and Phi-3 are Llama's arithmetic
# with q/k/v (and Phi-3's gate/up) packed into one tensor, which the loader unpacks
# (`vlmd.models.layouts`).
TEXT_FAMILIES = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "InternLM2ForCausalLM": "internlm2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
}
# transformers' `text_config.model_type` -> the family (the -hf conversions of InternLM2 are Llama).
HF_TEXT_MODEL_TYPES = {"qwen2": "qwen2", "llama": "llama", "qwen3": "qwen3", "phi3": "phi3"}

SUPPORTED = (
    "vlmd serves dense InternVL checkpoints: OpenGVLab's 'internvl_chat' with a "
    f"{', '.join(TEXT_FAMILIES)} language model (InternVL 2 / 2.5 / 3 / 3.5), or transformers' "
    f"'internvl' with text_config.model_type in {', '.join(HF_TEXT_MODEL_TYPES)} (the -hf conversions)"
)


class UnsupportedModel(ValueError):
    """config.json describes a model vlmd does not run; the message says what it does run."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what}; {SUPPORTED}")


@dataclass(frozen=True)
class InternVLArch:
    """Everything vlmd needs to know about an InternVL (InternViT + MLP projector + a decoder LM).

    Language-model fields follow the HF config keys; vision fields carry a `vision_` prefix.
    Values are validated on construction by `from_config_dict`, so holders may trust them.
    """

    # Language model.
    text_family: str  # a value of TEXT_FAMILIES
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int  # the context vlmd serves (`vlmd.models.formats` bounds it)
    tie_word_embeddings: bool
    # Vision tower (InternViT).
    vision_hidden_size: int
    vision_num_hidden_layers: int  # the layers that run: those up to the selected feature layer
    vision_num_attention_heads: int
    vision_intermediate_size: int
    vision_norm_type: str  # "layer_norm" or "rms_norm"
    vision_layer_norm_eps: float
    vision_use_qk_norm: bool
    vision_attention_bias: bool
    vision_final_norm: bool  # a LayerNorm after the last layer (HF-native configs without mean pooling)
    vision_use_absolute_position_embeddings: bool
    num_channels: int
    image_size: int  # side of one square tile, in pixels
    patch_size: int
    # Glue between the two.
    downsample_ratio: float
    pixel_shuffle_v1: bool  # OpenGVLab's ps_version "v1": the shuffled grid stays transposed
    image_seq_length: int  # LM tokens per tile, after pixel shuffle
    image_token_id: int | None  # None: found by name (<IMG_CONTEXT>) in the tokenizer
    dtype: str  # the checkpoint's torch dtype name, e.g. "bfloat16"
    layout: str = HF_NATIVE  # OPENGVLAB or HF_NATIVE: how the safetensors keys are laid out
    template: str | None = None  # OpenGVLab's conversation template name (config.json "template")
    # LongRoPE (Phi-3's "su" / "longrope"): within the original context, each rotary frequency is
    # divided by its short factor and cos/sin are scaled by the attention factor. None: plain RoPE.
    rope_short_factor: tuple[float, ...] | None = None
    rope_attention_factor: float = 1.0

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
        return cls.from_config_dict(read_config(model_dir))

    @classmethod
    def from_config_dict(cls, config: dict[str, Any]) -> InternVLArch:
        from vlmd.models.formats import arch_fields  # the two dialects; imports this module

        fields, declared_image_seq_length = arch_fields(config)
        arch = cls(**fields)
        arch.check_integrity(declared_image_seq_length)
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
        if self.text_family not in TEXT_FAMILIES.values():
            raise ValueError(f"unknown text family {self.text_family!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.vision_hidden_size % self.vision_num_attention_heads:
            raise ValueError("vision hidden_size must be a multiple of vision num_attention_heads")
        if self.vision_norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"unsupported vision norm_type {self.vision_norm_type!r}")
        if self.vision_num_hidden_layers < 1:
            raise ValueError("the selected vision feature layer leaves no ViT layer to run")
        if declared_image_seq_length is not None and declared_image_seq_length != self.image_seq_length:
            raise ValueError(
                f"config.json says image_seq_length={declared_image_seq_length} but image_size="
                f"{self.image_size}, patch_size={self.patch_size} and downsample_ratio="
                f"{self.downsample_ratio} give {self.image_seq_length}"
            )
        if self.image_token_id is not None and not 0 <= self.image_token_id < self.vocab_size:
            raise ValueError(f"image_token_id={self.image_token_id} is outside the vocabulary")
        if self.rope_short_factor is not None and len(self.rope_short_factor) * 2 != self.head_dim:
            raise ValueError(
                f"the RoPE short_factor has {len(self.rope_short_factor)} values; head_dim "
                f"{self.head_dim} needs {self.head_dim // 2}"
            )


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """config.json of a model directory, or ValueError saying why there is none."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{model_dir}: no config.json, not a model directory")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return config
