"""A tiny random-weight InternVL checkpoint in the HF-native layout, for tests and demos.

`write_demo_model(path)` writes everything a real InternVL3-hf repo has that vlmd reads:
config.json, model.safetensors, a byte-level BPE tokenizer (tokenizer.json +
tokenizer_config.json with the ChatML template), preprocessor_config.json and
generation_config.json. Output is a pure function of (seed, overrides).

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
from safetensors.torch import save_file
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

# Init stds (see the module docstring for why they are this large).
EMBED_STD = 1.0  # token embeddings (and the tied LM head): logits have std ~ sqrt(hidden)
LM_HEAD_STD = 1.0  # untied LM head, same scale as the tied one
QK_GAIN = 2.0  # q/k projections at 2/sqrt(fan_in): attention that picks, not averages
BIAS_STD = 0.1
POS_EMBED_STD = 0.3  # vision positions: present, but smaller than the content signal
PATCH_GAIN = 2.0  # patch conv at 2/sqrt(3*14*14): pixels dominate the first residual stream
PROJECTOR_OUT_GAIN = 2.0  # image rows end up with a norm like a text embedding's

DEFAULT_TEXT_CONFIG: dict[str, Any] = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    "use_sliding_window": False,
    "sliding_window": None,
    "attention_dropout": 0.0,
    "use_cache": True,
    "dtype": "float32",
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
      tie_word_embeddings: bool (default False);
      key_layout: "hub" (model.language_model.*, default) or "legacy" (language_model.model.*,
        what transformers 5 `save_pretrained` writes);
      num_shards: split the weights over this many files with an index (default 1);
      any other key is written at the top level of config.json.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    options = dict(overrides)
    key_layout = options.pop("key_layout", "hub")
    num_shards = options.pop("num_shards", 1)
    tokenizer = build_tokenizer()
    token_ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    config = demo_config(tokenizer.get_vocab_size(), token_ids, options)

    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", _tokenizer_config(token_ids, config))
    _write_json(out / "config.json", config)
    _write_json(out / "preprocessor_config.json", _preprocessor_config(config))
    _write_json(out / "processor_config.json", {"image_seq_length": config["image_seq_length"]})
    _write_json(out / "generation_config.json", _generation_config(token_ids))
    tensors = demo_weights(config, seed)
    if key_layout == "legacy":
        tensors = {_legacy_key(key): value for key, value in tensors.items()}
    elif key_layout != "hub":
        raise ValueError(f"key_layout must be 'hub' or 'legacy', not {key_layout!r}")
    _write_safetensors(out, tensors, num_shards)


def demo_config(vocab_size: int, token_ids: dict[str, int], options: dict[str, Any]) -> dict[str, Any]:
    """config.json for the demo model, with `options` (see write_demo_model) applied."""
    options = dict(options)
    tie = options.pop("tie_word_embeddings", False)
    text = {**copy.deepcopy(DEFAULT_TEXT_CONFIG), "vocab_size": vocab_size, **options.pop("text_config", {})}
    text.update(
        tie_word_embeddings=tie, bos_token_id=token_ids["<|endoftext|>"], eos_token_id=token_ids["<|im_end|>"]
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
    return config


def demo_weights(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Float32 weights in the hub key layout, drawn in a fixed order from one seeded generator."""
    init = _Init(seed)
    tensors = _vision_weights(init, config["vision_config"], "model.vision_tower.")
    tensors |= _projector_weights(init, config, "model.multi_modal_projector.")
    tensors |= _text_weights(init, config["text_config"], "model.language_model.")
    if not config["tie_word_embeddings"]:
        text = config["text_config"]
        tensors["lm_head.weight"] = init.normal((text["vocab_size"], text["hidden_size"]), LM_HEAD_STD)
    return tensors


class _Init:
    """Seeded draws; every tensor is float32 and contiguous (what safetensors wants)."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def normal(self, shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen) * std

    def linear(self, out_dim: int, in_dim: int, gain: float = 1.0) -> torch.Tensor:
        return self.normal((out_dim, in_dim), gain / math.sqrt(in_dim))

    def norm_weight(self, dim: int) -> torch.Tensor:
        """Norm gains in [0.5, 1.5): random so each channel matters differently."""
        return 0.5 + torch.rand((dim,), generator=self.gen)


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
        t[layer + "lambda_1"] = 0.5 + 0.5 * torch.rand((hidden,), generator=init.gen)
        t[layer + "lambda_2"] = 0.5 + 0.5 * torch.rand((hidden,), generator=init.gen)
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
    t = {prefix + "embed_tokens.weight": init.normal((text["vocab_size"], hidden), EMBED_STD)}
    for i in range(text["num_hidden_layers"]):
        layer = f"{prefix}layers.{i}."
        for name, size, gain in (
            ("q_proj", q_size, QK_GAIN),
            ("k_proj", kv_size, QK_GAIN),
            ("v_proj", kv_size, 1.0),
        ):
            t[f"{layer}self_attn.{name}.weight"] = init.linear(size, hidden, gain)
            t[f"{layer}self_attn.{name}.bias"] = init.normal((size,), BIAS_STD)
        t[layer + "self_attn.o_proj.weight"] = init.linear(hidden, q_size)
        t[layer + "mlp.gate_proj.weight"] = init.linear(inter, hidden)
        t[layer + "mlp.up_proj.weight"] = init.linear(inter, hidden)
        t[layer + "mlp.down_proj.weight"] = init.linear(hidden, inter)
        t[layer + "input_layernorm.weight"] = init.norm_weight(hidden)
        t[layer + "post_attention_layernorm.weight"] = init.norm_weight(hidden)
    # Random signs on the final norm: with tied embeddings the residual stream still holds the
    # current token's own embedding e, and a positive gain would make e.(g*e) ~ |e|^2 the top
    # logit every step (the model repeats its input token forever); zero-mean gains cancel it.
    signs = torch.randint(0, 2, (hidden,), generator=init.gen) * 2 - 1
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


def _write_safetensors(out: Path, tensors: dict[str, torch.Tensor], num_shards: int) -> None:
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
    _write_json(
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


def _generation_config(token_ids: dict[str, int]) -> dict[str, Any]:
    return {
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": [token_ids["<|im_end|>"], token_ids["<|endoftext|>"]],
        "pad_token_id": token_ids["<|endoftext|>"],
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


# --- tokenizer ---------------------------------------------------------------------------------

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
)
# The attribute names InternVLProcessor reads from the tokenizer (tokenizer.start_image_token, ...).
EXTRA_SPECIAL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
TOKENIZER_VOCAB_SIZE = 1000  # byte alphabet + merges + SPECIAL_TOKENS
# ChatML as the InternVL-hf repos render it: an image part becomes one <IMG_CONTEXT> line that
# the server later expands to <img> + <IMG_CONTEXT> * (image_seq_length * tiles) + </img>.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] in ('image', 'image_url') -%}{{- '<IMG_CONTEXT>\\n' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<video>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
# Qwen2's pre-tokenizer split: transformers' Qwen2Tokenizer rebuilds its pipeline with this
# pattern whatever tokenizer.json says, so ours must be the same for both to agree.
_SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_CORPUS = """
A photo of a small red cat sitting on a wooden table next to a cup of coffee.
The image shows a busy street at night, with cars, buses and bright shop signs.
What is in this picture? Please describe the image in detail.
There are three people walking a dog along the beach while the sun sets over the ocean.
The chart compares the revenue of four companies between 2019 and 2024.
A green bicycle is parked beside a blue door; flowers grow in a white pot.
Describe the colours, the objects and the text that you can see in the image.
The document is a receipt from a grocery store listing milk, bread, eggs and apples.
A mountain lake reflects snowy peaks under a clear sky with a few clouds.
Two children are playing football in a park surrounded by tall trees.
The screenshot shows a settings page with buttons, menus and a search box.
An old map of the city marks the river, the bridges, the castle and the market square.
The kitchen has a stove, a sink, a window and shelves full of plates and glasses.
This diagram explains how a neural network turns pixels into words step by step.
The answer is yes: the yellow taxi is on the left and the black truck is on the right.
A plate of noodles with vegetables, chopsticks and a bowl of soup on the side.
How many apples are on the table? I can count five apples and two oranges.
The handwritten note says: meet me at the train station at seven o'clock tomorrow.
The user asked a question about the image, and the assistant answered it politely.
Please read the sign and tell me what it says. It says "No parking on weekdays".
The weather today is sunny and warm, perfect for a walk in the garden.
A scientist looks through a microscope in a laboratory full of bottles and tubes.
The painting shows a quiet village by the sea with boats, houses and a church.
You are a helpful assistant. Answer the question using the image and the text.
The bar chart shows that sales grew by twenty percent in the second quarter.
A close-up of a flower with purple petals, a yellow centre and a bee collecting pollen.
In the video, a man opens the box, takes out a camera and starts recording.
The slide lists the main points: speed, memory, accuracy, cost and safety.
The robot arm picks up a box from the conveyor belt and places it on a shelf.
A crowded train platform during the morning rush hour in a large city.
Here is a summary of the article about climate, energy, water and food.
It's raining, so we'll stay inside, read books and watch a film together.
The table has columns for name, age, city and score, and ten rows of data.
Large language models can look at images, read text and answer questions.
这是什么？这是一只坐在窗台上的小猫。
请描述这张图片的内容。图片里有一座山、一条河和几棵树。
图中有三个人在公园里散步，天气很好。
这张照片拍的是夜晚的城市街道，路上有很多汽车和行人。
桌子上有一杯咖啡、一本书和一个红色的苹果。
请问图片中的文字是什么意思？
这是一张收据，上面写着牛奶、面包和鸡蛋的价格。
他们在海边看日落，天空是橙色和紫色的。
这个图表显示了公司从二零一九年到二零二四年的收入变化。
孩子们在学校的操场上踢足球。
我可以看到一只狗、一辆自行车和一扇蓝色的门。
你是一个有帮助的助手，请根据图片回答问题。
图片的左边是一辆黄色的出租车，右边是一辆黑色的卡车。
厨房里有炉子、水槽、窗户和放满盘子的架子。
这幅画描绘了一个安静的海边小村庄。
机器人从传送带上拿起一个箱子，放到架子上。
今天天气晴朗，适合去花园里散步。
这是一张地图，上面标出了河流、桥梁和市场。
请数一数桌子上有几个苹果。桌子上有五个苹果。
视频里，一个人打开盒子，拿出一台相机。
"""


def build_tokenizer() -> Tokenizer:
    """Train the demo's byte-level BPE on _CORPUS (deterministic), special tokens appended last."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.strip().splitlines(), trainer)
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    )
    return tokenizer


def _tokenizer_config(token_ids: dict[str, int], config: dict[str, Any]) -> dict[str, Any]:
    """What transformers needs to rebuild the tokenizer offline, as the InternVL-hf repos write it."""
    added = {
        str(token_ids[token]): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token in SPECIAL_TOKENS
    }
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": config["text_config"]["max_position_embeddings"],
        "extra_special_tokens": EXTRA_SPECIAL_TOKENS,
        "chat_template": CHAT_TEMPLATE,
    }
