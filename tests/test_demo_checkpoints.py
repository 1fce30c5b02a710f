"""The tiny demo checkpoints: HF-native for each text family and tokenizer (`vlmd.demo`), and
OpenGVLab's format for each backbone (`vlmd.demo_opengvlab`).

transformers is the judge: it must load the HF directories, and transformers' own conversion
rules (`convert_internvl_weights_to_hf.py`, restated below) applied to an OpenGVLab directory
must give back the HF directory's tensors exactly, so that transformers on the HF directory is
the reference for a server loading the OpenGVLab one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoTokenizer, InternVLForConditionalGeneration

from vlmd import cli
from vlmd.demo import read_demo_weights, write_demo_model
from vlmd.demo_opengvlab import BACKBONES, hf_demo_options, write_opengvlab_model
from vlmd.models.config import HF_NATIVE, OPENGVLAB, InternVLArch

FAMILIES = ("qwen2", "llama", "qwen3")
SP_SPECIAL_IDS = {
    "<unk>": 0,
    "<s>": 1,
    "</s>": 2,
    "<0x0A>": 13,
    "<|im_end|>": 989,
    "<|im_start|>": 990,
    "<img>": 991,
    "</img>": 992,
    "<IMG_CONTEXT>": 993,
    "<quad>": 994,
    "</quad>": 995,
    "<ref>": 996,
    "</ref>": 997,
    "<box>": 998,
    "</box>": 999,
}
TEXTS = (
    "Hello world",
    " leading and trailing spaces  ",
    "It's 2024!  Tabs\tand\n\nnewlines\r\n",
    "这是什么？这是一只坐在窗台上的小猫。",
    "emoji 🐱🚀 and accents: café, naïve",
    "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nDescribe it.<|im_end|>\n<|im_start|>assistant\n",
    "<ref>the cat</ref><box>[[1, 2, 3, 4]]</box><quad>x</quad>",
    "<0x41> is not a byte token in text",
)


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The HF-native demo each backbone is converted from (internlm2: Llama + SentencePiece)."""
    root = tmp_path_factory.mktemp("hf")
    for backbone in BACKBONES:
        write_demo_model(root / backbone, seed=1, **hf_demo_options(backbone))
    return {backbone: root / backbone for backbone in BACKBONES}


@pytest.fixture(scope="module")
def og_dirs(tmp_path_factory: pytest.TempPathFactory, hf_dirs: dict[str, Path]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("opengvlab")
    for backbone in BACKBONES:
        write_opengvlab_model(hf_dirs[backbone], root / backbone, backbone, num_shards=2)
    return {backbone: root / backbone for backbone in BACKBONES}


def _config(model_dir: Path, name: str = "config.json") -> dict:
    return json.loads((model_dir / name).read_text())


# --- HF-native demos ---------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", BACKBONES)
def test_transformers_loads_each_family(hf_dirs: dict[str, Path], backbone: str) -> None:
    model, info = InternVLForConditionalGeneration.from_pretrained(
        hf_dirs[backbone], dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    family = hf_demo_options(backbone)["text_config"]["model_type"]
    text = model.model.language_model
    assert (
        type(text).__name__
        == {"qwen2": "Qwen2Model", "llama": "LlamaModel", "qwen3": "Qwen3Model", "phi3": "Phi3Model"}[family]
    )
    params = {name: p.shape for name, p in text.layers[0].named_parameters()}
    biases = {name for name in params if name.endswith(".bias")}
    assert biases == ({f"self_attn.{name}_proj.bias" for name in "qkv"} if family == "qwen2" else set())
    qk_norms = {name for name in params if name.startswith("self_attn.") and "_norm." in name}
    assert qk_norms == (
        {"self_attn.q_norm.weight", "self_attn.k_norm.weight"} if family == "qwen3" else set()
    )
    if family == "qwen3":
        head_dim = text.config.head_dim
        assert params["self_attn.q_norm.weight"] == (head_dim,)
        assert text.config.num_attention_heads * head_dim != text.config.hidden_size
        assert params["self_attn.q_proj.weight"] == (text.config.num_attention_heads * head_dim, 192)
    if family == "llama":
        assert not text.config.attention_bias and not text.config.mlp_bias
    if family == "phi3":  # packed as Phi-3 checkpoints are, with LongRoPE
        assert {"self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"} <= params.keys()
        assert text.config.rope_parameters["rope_type"] == "longrope"
    assert InternVLArch.from_model_dir(hf_dirs[backbone]).text_family == family


@pytest.mark.parametrize("backbone", BACKBONES)
def test_each_family_wanders_and_follows_the_image(hf_dirs: dict[str, Path], backbone: str) -> None:
    """The demo's init (vlmd.demo's docstring) holds for every family: greedy output is not one
    token repeated, and changes with the image."""
    model = InternVLForConditionalGeneration.from_pretrained(hf_dirs[backbone], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dirs[backbone])
    image = "<img>" + "<IMG_CONTEXT>" * 256 + "</img>"
    prompt = f"<|im_start|>user\n{image}\nWhat is in this picture?<|im_end|>\n<|im_start|>assistant\n"
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(0)
    outputs = []
    for _ in range(2):
        pixels = torch.randn((1, 3, 448, 448), generator=generator)
        with torch.no_grad():
            out = model.generate(
                input_ids, pixel_values=pixels, max_new_tokens=16, do_sample=False, eos_token_id=None
            )
        outputs.append(out[0, input_ids.shape[1] :].tolist())
    assert all(len(set(tokens)) >= 8 for tokens in outputs), outputs
    assert outputs[0] != outputs[1]


def test_sentencepiece_tokenizer_agrees_with_its_tokenizer_json(hf_dirs: dict[str, Path]) -> None:
    model_dir = hf_dirs["internlm2"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert type(tokenizer).__name__ == "LlamaTokenizer"  # what "LlamaTokenizerFast" names in transformers 5
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in SP_SPECIAL_IDS} == SP_SPECIAL_IDS
    assert {token: raw.token_to_id(token) for token in SP_SPECIAL_IDS} == SP_SPECIAL_IDS
    assert _config(model_dir)["image_token_id"] == SP_SPECIAL_IDS["<IMG_CONTEXT>"]
    assert InternVLArch.from_model_dir(model_dir).image_token_id == SP_SPECIAL_IDS["<IMG_CONTEXT>"]
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert ids == raw.encode(text).ids, text
        assert ids[0] == SP_SPECIAL_IDS["<s>"] and ids.count(SP_SPECIAL_IDS["<s>"]) == 1
        assert tokenizer.decode(ids, skip_special_tokens=False) == "<s>" + text
    assert tokenizer("a\nb")["input_ids"][2] == SP_SPECIAL_IDS["<0x0A>"]  # "\n" falls back to its byte
    assert tokenizer.decode(tokenizer("🐱 猫")["input_ids"], skip_special_tokens=True) == "🐱 猫"
    text_config, generation = _config(model_dir)["text_config"], _config(model_dir, "generation_config.json")
    assert (text_config["bos_token_id"], text_config["eos_token_id"]) == (1, 2)
    assert generation["eos_token_id"] == SP_SPECIAL_IDS["<|im_end|>"]


@pytest.mark.parametrize("options", [{}, *({"text_config": {"model_type": f}} for f in FAMILIES[1:])])
def test_demo_is_a_pure_function_of_its_arguments(tmp_path: Path, options: dict) -> None:
    write_demo_model(tmp_path / "a", seed=5, tokenizer="sentencepiece", **options)
    write_demo_model(tmp_path / "b", seed=5, tokenizer="sentencepiece", **options)
    _assert_same_files(tmp_path / "a", tmp_path / "b")


# --- OpenGVLab format --------------------------------------------------------------------------

# transformers' convert_internvl_weights_to_hf.py, restated: regex renames over the key groups
# (vision_model.*, language_model.*, the rest), the Llama renames for InternLM2, then the splits.
_SCRIPT_VISION = (
    (r"vision_model", "vision_tower"),
    (r"layers", "layer"),
    (r"class_embedding", "cls_token"),
    (r"position_embedding", "position_embeddings"),
    (r"patch_embedding", "patch_embeddings.projection"),
    (r"ls(\d+)", r"lambda_\1"),
    (r"attn.proj", "attention.projection_layer"),
    (r"attn.dropout", "attention.projection_dropout"),
    (r"attn", "attention"),
    (r"norm1", "layernorm_before"),
    (r"norm2", "layernorm_after"),
)
_SCRIPT_INTERNLM2 = (
    (r"tok_embeddings", "embed_tokens"),
    (r"attention.wo", "self_attn.o_proj"),
    (r"feed_forward.w1", "mlp.gate_proj"),
    (r"feed_forward.w2", "mlp.down_proj"),
    (r"feed_forward.w3", "mlp.up_proj"),
    (r"attention_norm", "input_layernorm"),
    (r"ffn_norm", "post_attention_layernorm"),
    (r"output", "lm_head"),
)
_SCRIPT_PROJECTOR = (
    (r"mlp1.0", "multi_modal_projector.layer_norm"),
    (r"mlp1.1", "multi_modal_projector.linear_1"),
    (r"mlp1.3", "multi_modal_projector.linear_2"),
)
# What transformers' loader then does with the script's (save_pretrained's legacy) key prefixes.
_LEGACY_TO_HUB = (
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
)


def _script_key(key: str, backbone: str) -> str:
    if key.startswith("vision_model"):
        renames = _SCRIPT_VISION
    elif key.startswith("language_model"):
        renames = _SCRIPT_INTERNLM2 if backbone == "internlm2" else ()
    else:
        renames = _SCRIPT_PROJECTOR
    for pattern, replacement in renames:
        key = re.sub(pattern, replacement, key)
    return key


def _hub(key: str) -> str:
    for legacy, hub in _LEGACY_TO_HUB:
        if key.startswith(legacy):
            return hub + key[len(legacy) :]
    raise AssertionError(key)


def convert_like_transformers(og_dir: Path, backbone: str) -> dict[str, torch.Tensor]:
    """The HF tensors transformers' conversion makes of an OpenGVLab directory (hub keys)."""
    config = _config(og_dir)
    text, vision_dim = config["llm_config"], config["vision_config"]["hidden_size"]
    index = og_dir / "model.safetensors.index.json"
    names = (
        set(_config(og_dir, index.name)["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    )
    old = {key: value for name in names for key, value in load_file(og_dir / name).items()}
    out = {}
    for key, value in old.items():
        new_key = _script_key(key, backbone)
        if key.startswith("vision_model") and "attn.qkv" in key:  # not Phi-3's self_attn.qkv_proj
            for name, rows in (
                ("q", value[:vision_dim]),
                ("k", value[vision_dim : 2 * vision_dim]),
                ("v", value[-vision_dim:]),
            ):
                out[new_key.replace("attention.qkv", f"attention.{name}_proj")] = rows
        elif "attention.wqkv" in key:
            groups = text["num_attention_heads"] // text["num_key_value_heads"]
            head_dim, hidden = text["hidden_size"] // text["num_attention_heads"], text["hidden_size"]
            heads = value.reshape(-1, 2 + groups, head_dim, hidden)  # "(h gs d) z -> h gs d z"
            out[new_key.replace("attention.wqkv", "self_attn.q_proj")] = heads[:, :groups].reshape(-1, hidden)
            out[new_key.replace("attention.wqkv", "self_attn.k_proj")] = heads[:, -2].reshape(-1, hidden)
            out[new_key.replace("attention.wqkv", "self_attn.v_proj")] = heads[:, -1].reshape(-1, hidden)
        else:
            out[new_key] = value
    return {_hub(key): value for key, value in out.items()}


@pytest.mark.parametrize("backbone", BACKBONES)
def test_transformers_conversion_gives_back_the_hf_tensors(
    hf_dirs: dict[str, Path], og_dirs: dict[str, Path], backbone: str
) -> None:
    converted = convert_like_transformers(og_dirs[backbone], backbone)
    expected = load_file(hf_dirs[backbone] / "model.safetensors")
    assert converted.keys() == expected.keys()
    for key, value in expected.items():
        assert converted[key].dtype == torch.float32 and torch.equal(converted[key], value), key


_VISION_KEYS = {
    "vision_model.embeddings.class_embedding",
    "vision_model.embeddings.position_embedding",
    *(f"vision_model.embeddings.patch_embedding.{p}" for p in ("weight", "bias")),
    *(
        f"vision_model.encoder.layers.N.{name}.{p}"
        for name in ("attn.qkv", "attn.proj", "norm1", "norm2", "mlp.fc1", "mlp.fc2")
        for p in ("weight", "bias")
    ),
    "vision_model.encoder.layers.N.ls1",
    "vision_model.encoder.layers.N.ls2",
    *(f"mlp1.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")),
}
_LLAMA_KEYS = {
    "language_model.model.embed_tokens.weight",
    *(f"language_model.model.layers.N.self_attn.{name}_proj.weight" for name in "qkvo"),
    *(f"language_model.model.layers.N.mlp.{name}_proj.weight" for name in ("gate", "up", "down")),
    "language_model.model.layers.N.input_layernorm.weight",
    "language_model.model.layers.N.post_attention_layernorm.weight",
    "language_model.model.norm.weight",
    "language_model.lm_head.weight",
}
OPENGVLAB_KEYS = {
    "qwen2": _VISION_KEYS
    | _LLAMA_KEYS
    | {f"language_model.model.layers.N.self_attn.{n}_proj.bias" for n in "qkv"},
    "llama": _VISION_KEYS | _LLAMA_KEYS,
    "qwen3": _VISION_KEYS
    | _LLAMA_KEYS
    | {f"language_model.model.layers.N.self_attn.{n}_norm.weight" for n in "qk"},
    "internlm2": _VISION_KEYS
    | {
        "language_model.model.tok_embeddings.weight",
        *(f"language_model.model.layers.N.attention.{name}.weight" for name in ("wqkv", "wo")),
        *(f"language_model.model.layers.N.feed_forward.w{i}.weight" for i in (1, 2, 3)),
        "language_model.model.layers.N.attention_norm.weight",
        "language_model.model.layers.N.ffn_norm.weight",
        "language_model.model.norm.weight",
        "language_model.output.weight",
    },
    "phi3": _VISION_KEYS
    | {
        "language_model.model.embed_tokens.weight",
        *(f"language_model.model.layers.N.self_attn.{name}.weight" for name in ("qkv_proj", "o_proj")),
        *(f"language_model.model.layers.N.mlp.{name}.weight" for name in ("gate_up_proj", "down_proj")),
        "language_model.model.layers.N.input_layernorm.weight",
        "language_model.model.layers.N.post_attention_layernorm.weight",
        "language_model.model.norm.weight",
        "language_model.lm_head.weight",
    },
}


@pytest.mark.parametrize("backbone", BACKBONES)
def test_opengvlab_keys(og_dirs: dict[str, Path], backbone: str) -> None:
    weight_map = _config(og_dirs[backbone], "model.safetensors.index.json")["weight_map"]
    assert {re.sub(r"\.layers\.\d+\.", ".layers.N.", key) for key in weight_map} == OPENGVLAB_KEYS[backbone]
    assert len(set(weight_map.values())) == 2


@pytest.mark.parametrize(
    "vision_config",
    [{"use_qk_norm": True, "norm_type": "rms_norm", "attention_bias": False}, {"num_hidden_layers": 3}],
)
def test_vision_variants_round_trip(tmp_path: Path, vision_config: dict) -> None:
    write_demo_model(tmp_path / "hf", seed=2, vision_config=vision_config)
    write_opengvlab_model(tmp_path / "hf", tmp_path / "og", "qwen2")
    converted = convert_like_transformers(tmp_path / "og", "qwen2")
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    assert converted.keys() == hf.keys() and all(torch.equal(converted[k], hf[k]) for k in hf)
    vision = _config(tmp_path / "og")["vision_config"]
    assert (vision["qk_normalization"], vision["qkv_bias"]) == (
        vision_config.get("use_qk_norm", False),
        vision_config.get("attention_bias", True),
    )


def test_tied_and_legacy_hf_dirs_convert_too(tmp_path: Path) -> None:
    """A tied HF model gets an explicit head (OpenGVLab unties it); a legacy-key, sharded source
    converts to the same files as the hub one."""
    write_demo_model(tmp_path / "hub", seed=2, tie_word_embeddings=True)
    write_demo_model(tmp_path / "legacy", seed=2, tie_word_embeddings=True, key_layout="legacy", num_shards=3)
    for source in ("hub", "legacy"):
        write_opengvlab_model(tmp_path / source, tmp_path / f"og_{source}", "qwen2")
    _assert_same_files(tmp_path / "og_hub", tmp_path / "og_legacy")
    converted = convert_like_transformers(tmp_path / "og_hub", "qwen2")
    hf = read_demo_weights(tmp_path / "hub")
    assert torch.equal(converted.pop("lm_head.weight"), hf["model.language_model.embed_tokens.weight"])
    assert converted.keys() == hf.keys() and all(torch.equal(converted[k], hf[k]) for k in hf)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_opengvlab_config_describes_the_same_model(
    hf_dirs: dict[str, Path], og_dirs: dict[str, Path], backbone: str
) -> None:
    config = _config(og_dirs[backbone])
    llm, vision = config["llm_config"], config["vision_config"]
    assert (config["model_type"], config["architectures"]) == ("internvl_chat", ["InternVLChatModel"])
    assert config["auto_map"]["AutoModel"] == "modeling_internvl_chat.InternVLChatModel"
    assert not (og_dirs[backbone] / "modeling_internvl_chat.py").exists()
    assert config["template"] == {"internlm2": "internlm2-chat", "phi3": "phi3-chat"}.get(
        backbone, "internvl2_5"
    )
    assert (config["force_image_size"], config["ps_version"], config["select_layer"]) == (448, "v2", -1)
    assert (config["min_dynamic_patch"], config["max_dynamic_patch"], config["use_thumbnail"]) == (
        1,
        12,
        True,
    )
    architecture = {
        "qwen2": "Qwen2",
        "llama": "Llama",
        "qwen3": "Qwen3",
        "internlm2": "InternLM2",
        "phi3": "Phi3",
    }[backbone]
    assert (llm["architectures"], llm["model_type"]) == ([f"{architecture}ForCausalLM"], backbone)
    assert llm["tie_word_embeddings"] is False and llm["rope_theta"] == (1e4 if backbone == "phi3" else 1e6)
    if backbone == "phi3":  # as InternVL2-4B's llm_config says it
        assert (llm["rope_scaling"]["type"], llm["original_max_position_embeddings"]) == ("su", 4096)
        assert len(llm["rope_scaling"]["short_factor"]) == len(llm["rope_scaling"]["long_factor"]) == 32
        assert (llm["max_position_embeddings"], llm["sliding_window"]) == (131072, 262144)
    if backbone == "internlm2":
        assert (llm["bias"], llm["rope_scaling"]) == (False, {"type": "dynamic", "factor": 2.0})
        assert llm["auto_map"]["AutoConfig"] == "configuration_internlm2.InternLM2Config"
        assert (llm["bos_token_id"], llm["eos_token_id"]) == (1, 2)
    if backbone == "qwen3":
        assert (llm["head_dim"], llm["hidden_size"], llm["attention_bias"]) == (64, 192, False)
    if backbone == "qwen2":
        assert llm["use_sliding_window"] is False and "attention_bias" not in llm
    assert (vision["model_type"], vision["architectures"]) == ("intern_vit_6b", ["InternVisionModel"])
    assert (vision["qkv_bias"], vision["qk_normalization"], vision["use_flash_attn"]) == (True, False, False)
    # vlmd reads both dialects into the same architecture.
    og, hf = InternVLArch.from_model_dir(og_dirs[backbone]), InternVLArch.from_model_dir(hf_dirs[backbone])
    assert (og.layout, hf.layout, og.text_family, og.image_token_id) == (OPENGVLAB, HF_NATIVE, backbone, None)
    differs = {"layout", "template", "image_token_id", "tie_word_embeddings", "text_family"}
    assert {k: v for k, v in vars(og).items() if k not in differs} == {
        k: v for k, v in vars(hf).items() if k not in differs
    }


@pytest.mark.parametrize("layout", ["hf", "opengvlab"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_token_bytes_add_up_to_the_text_in_every_vocabulary(hf_dirs, og_dirs, backbone, layout):
    """OpenAI's logprob `bytes`: each token's own, byte-level (Qwen2, Llama 3) or SentencePiece
    with byte fallback (InternLM2): after the first token, they add up to the UTF-8 of the text."""
    from vlmd.actors.tokenizer import PromptBuilder

    model_dir = (hf_dirs if layout == "hf" else og_dirs)[backbone]
    builder = PromptBuilder(str(model_dir), image_seq_length=256, trust_remote_code=True)
    text = "Ask: 这是什么？ héllo, wörld @ 3 ½\nnext line"
    ids = builder.tokenizer.encode(text, add_special_tokens=False)
    head = builder.tokenizer.decode(ids[:1])
    whole = builder.tokenizer.decode(ids)
    assert b"".join(builder.token_bytes(i) for i in ids[1:]) == whole[len(head) :].encode()


def test_internlm2_tokenizer_is_remote_code(hf_dirs: dict[str, Path], og_dirs: dict[str, Path]) -> None:
    og_dir = og_dirs["internlm2"]
    assert _config(og_dir, "tokenizer_config.json")["auto_map"] == {
        "AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]
    }
    with pytest.raises(ValueError, match="custom code"):
        AutoTokenizer.from_pretrained(og_dir, trust_remote_code=False)
    # The refusal is the tokenizer's: config.json's auto_map alone does not make it.
    assert (
        type(AutoTokenizer.from_pretrained(og_dirs["qwen2"], trust_remote_code=False)).__name__
        == "Qwen2Tokenizer"
    )
    tokenizer = AutoTokenizer.from_pretrained(og_dir, trust_remote_code=True)
    reference = AutoTokenizer.from_pretrained(hf_dirs["internlm2"])
    assert type(tokenizer).__name__ == "InternLM2Tokenizer"
    assert tokenizer.convert_tokens_to_ids(list(SP_SPECIAL_IDS)) == list(SP_SPECIAL_IDS.values())
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert ids == reference(text)["input_ids"], text
        assert tokenizer.decode(ids, skip_special_tokens=False) == "<s>" + text


@pytest.mark.parametrize("backbone", ["qwen2", "qwen3", "llama"])
def test_qwen_tokenized_backbones_keep_the_hf_tokenizer(
    hf_dirs: dict[str, Path], og_dirs: dict[str, Path], backbone: str
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(og_dirs[backbone], trust_remote_code=False)
    reference = AutoTokenizer.from_pretrained(hf_dirs[backbone])
    assert type(tokenizer).__name__ == "Qwen2Tokenizer" and tokenizer.chat_template is None
    assert all(tokenizer(text)["input_ids"] == reference(text)["input_ids"] for text in TEXTS)


def test_generation_configs(hf_dirs: dict[str, Path], og_dirs: dict[str, Path], tmp_path: Path) -> None:
    for backbone, tokens in (
        ("qwen2", ("<|im_start|>", "<|im_end|>")),
        ("internlm2", ("<|im_end|>", "<|im_start|>")),
    ):
        raw = Tokenizer.from_file(str(og_dirs[backbone] / "tokenizer.json"))
        eos = _config(og_dirs[backbone], "generation_config.json")["eos_token_id"]
        assert eos == [raw.token_to_id(token) for token in tokens]
    assert _config(og_dirs["internlm2"], "generation_config.json")["eos_token_id"] == [989, 990]
    write_opengvlab_model(hf_dirs["qwen2"], tmp_path, "qwen2", generation_config=False, template="Hermes-2")
    assert not (tmp_path / "generation_config.json").exists()
    assert _config(tmp_path)["template"] == "Hermes-2"


def test_chat_templates(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    for variant in ("parts", "string"):
        write_opengvlab_model(hf_dirs["qwen2"], tmp_path / variant, "qwen2", chat_template=variant)
    parts = AutoTokenizer.from_pretrained(tmp_path / "parts", trust_remote_code=False)
    string = AutoTokenizer.from_pretrained(tmp_path / "string", trust_remote_code=False)
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "image"}]},
    ]
    assert parts.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nAnd <image>\n<|im_end|>\n<|im_start|>assistant\n"
    )
    flat = [{"role": "user", "content": "<image>\nWhat is it?"}]
    assert string.apply_chat_template(flat, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *flat]
    assert string.apply_chat_template(with_system, tokenize=False).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    )
    with pytest.raises(TypeError):  # like InternVL2-1B's, it concatenates content as a string
        string.apply_chat_template(chat, tokenize=False)


def test_opengvlab_output_is_deterministic(
    hf_dirs: dict[str, Path], og_dirs: dict[str, Path], tmp_path: Path
) -> None:
    for backbone in ("qwen3", "internlm2"):
        write_demo_model(tmp_path / f"hf_{backbone}", seed=1, **hf_demo_options(backbone))
        _assert_same_files(tmp_path / f"hf_{backbone}", hf_dirs[backbone])
        write_opengvlab_model(tmp_path / f"hf_{backbone}", tmp_path / backbone, backbone, num_shards=2)
        _assert_same_files(tmp_path / backbone, og_dirs[backbone])


def test_bad_sources_are_refused(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="backbone"):
        write_opengvlab_model(hf_dirs["qwen2"], tmp_path, "internlm2")  # a qwen2 model
    with pytest.raises(ValueError, match="tokenizer"):
        write_opengvlab_model(hf_dirs["internlm2"], tmp_path, "llama")  # the SentencePiece tokenizer
    with pytest.raises(ValueError, match="chat_template"):
        write_opengvlab_model(hf_dirs["qwen2"], tmp_path, "qwen2", chat_template="jinja")
    write_demo_model(tmp_path / "final_norm", vision_config={"use_mean_pooling": False})
    with pytest.raises(ValueError, match="final norm"):
        write_opengvlab_model(tmp_path / "final_norm", tmp_path / "out", "qwen2")


def test_cli_writes_both_layouts(tmp_path: Path, hf_dirs: dict[str, Path]) -> None:
    assert cli.DEMO_BACKBONES == BACKBONES
    assert (
        cli.main(
            [
                "demo-model",
                str(tmp_path / "og"),
                "--seed",
                "1",
                "--layout",
                "opengvlab",
                "--backbone",
                "internlm2",
            ]
        )
        == 0
    )
    write_opengvlab_model(hf_dirs["internlm2"], tmp_path / "direct", "internlm2")
    _assert_same_files(tmp_path / "og", tmp_path / "direct")
    assert cli.main(["demo-model", str(tmp_path / "hf"), "--seed", "1", "--backbone", "qwen3"]) == 0
    _assert_same_files(tmp_path / "hf", hf_dirs["qwen3"])


def _assert_same_files(a: Path, b: Path) -> None:
    names = sorted(path.name for path in a.iterdir())
    assert names == sorted(path.name for path in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_real_sizes_write_bf16_shards_that_both_loaders_read(tmp_path: Path) -> None:
    """`--size internvl3-8b` (here with its layers shrunk): bf16 weights in shards, read by
    transformers and by vlmd's loader to the same values."""
    from vlmd.demo import SIZES
    from vlmd.models.loader import load_language_model

    assert tuple(SIZES) == cli.DEMO_SIZES
    small = {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 96, "vocab_size": 1024}
    small |= {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    vision = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}
    write_demo_model(tmp_path, size="internvl3-8b", text_config=small, vision_config=vision)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dtype"] == config["text_config"]["dtype"] == "bfloat16"
    assert config["text_config"]["max_position_embeddings"] == 32768  # the size's, kept under the override
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) == 4 and {t.dtype for s in shards for t in load_file(s).values()} == {torch.bfloat16}
    hf = InternVLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    lm = load_language_model(str(tmp_path), torch.bfloat16, torch.device("cpu"))
    assert torch.equal(lm.lm_head.weight, hf.lm_head.weight)
