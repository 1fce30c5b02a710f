"""vlmd's InternVL (vision tower, Qwen2 LM, loader, demo checkpoint) against transformers.

transformers is only the oracle here; vlmd never runs its modeling code. Everything runs on the
tiny demo model in float32 on the CPU.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import AutoImageProcessor, AutoTokenizer, GenerationConfig, InternVLForConditionalGeneration
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from vlmd.demo import IMAGENET_MEAN, IMAGENET_STD, write_demo_model
from vlmd.kernels.add_norm import TORCH_ADD_LAYER_NORM, make_add_layer_norm
from vlmd.kernels.attention import BatchLayout, KVCacheSpec, TorchReferenceBackend
from vlmd.models.config import InternVLArch
from vlmd.models.loader import load_language_model, load_vision

NUM_NEW_TOKENS = 32
PAGE_SIZE = 16


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("demo")
    write_demo_model(path)
    return path


@pytest.fixture(scope="module")
def hf_model(demo_dir: Path) -> InternVLForConditionalGeneration:
    return _hf_model(demo_dir)


@pytest.fixture(scope="module")
def tokenizer(demo_dir: Path):
    return AutoTokenizer.from_pretrained(demo_dir)


@pytest.fixture(scope="module")
def vision(demo_dir: Path):
    return load_vision(demo_dir, torch.float32, "cpu")


@pytest.fixture(scope="module")
def lm(demo_dir: Path):
    return load_language_model(demo_dir, torch.float32, "cpu", num_threads=2)


@pytest.fixture(scope="module")
def images() -> dict[str, Image.Image]:
    """896x448 pictures: two tiles plus the thumbnail each (3 x 256 image tokens)."""
    rows, cols = np.mgrid[0:448, 0:896]
    halves = np.zeros((448, 896, 3), np.uint8)
    halves[:, :448], halves[:, 448:] = (200, 30, 30), (20, 40, 220)
    gradient = np.stack([cols * 255 // 895, rows * 255 // 447, (rows + cols) % 256], -1).astype(np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (448, 896, 3), dtype=np.uint8)
    return {
        name: Image.fromarray(a) for name, a in (("halves", halves), ("gradient", gradient), ("noise", noise))
    }


def _hf_model(path: Path) -> InternVLForConditionalGeneration:
    model = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    # generate() fills an eos it was not given from the model's generation_config, so clearing it
    # in the GenerationConfig passed in is not enough: vlmd's comparison runs ignore EOS.
    model.generation_config.eos_token_id = None
    return model


# --- helpers -----------------------------------------------------------------------------------


def _prompt(tokenizer, pictures: list[Image.Image], text: str) -> tuple[list[int], torch.Tensor | None]:
    """Token ids and pixel values, expanded the way transformers' InternVLProcessor does it."""
    processor = GotOcr2ImageProcessorPil(
        crop_to_patches=True,
        size={"height": 448, "width": 448},
        min_patches=1,
        max_patches=12,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    content = [{"type": "image"} for _ in pictures] + [{"type": "text", "text": text}]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    pieces = prompt.split("<IMG_CONTEXT>")
    assert len(pieces) == len(pictures) + 1
    expanded, tiles = pieces[0], []
    for picture, rest in zip(pictures, pieces[1:], strict=True):
        out = processor(images=[picture], return_tensors="pt")
        tiles.append(out["pixel_values"])
        expanded += "<img>" + "<IMG_CONTEXT>" * (256 * int(out["num_patches"][0])) + "</img>" + rest
    ids = tokenizer(expanded)["input_ids"]
    return ids, torch.cat(tiles) if tiles else None


def _hf_greedy(model, ids: list[int], pixel_values: torch.Tensor | None) -> list[int]:
    config = GenerationConfig(max_new_tokens=NUM_NEW_TOKENS, do_sample=False, eos_token_id=None)
    extra = {} if pixel_values is None else {"pixel_values": pixel_values}
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), generation_config=config, **extra)
    return out[0, len(ids) :].tolist()


def _backend(lm, num_pages: int) -> TorchReferenceBackend:
    arch = lm.arch
    spec = KVCacheSpec(
        num_layers=arch.num_hidden_layers,
        num_pages=num_pages,
        page_size=PAGE_SIZE,
        num_kv_heads=arch.num_key_value_heads,
        head_dim=arch.head_dim,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    return TorchReferenceBackend(spec, arch.num_attention_heads, arch.head_dim**-0.5)


@torch.no_grad()
def _vlmd_greedy(
    lm, vision, prompts: list[tuple[list[int], torch.Tensor | None]], margins: list[float] | None = None
) -> list[list[int]]:
    """Greedy-decode all prompts as one flattened batch: one prefill step, then one token each per step.

    `margins`, if given, collects each step's top-1 minus top-2 logit (per request).
    """
    max_pages = [math.ceil((len(ids) + NUM_NEW_TOKENS) / PAGE_SIZE) for ids, _ in prompts]
    attn = _backend(lm, sum(max_pages))
    # Pages handed out in a random order, so a request's pages are neither contiguous nor sorted.
    free = torch.randperm(sum(max_pages), generator=torch.Generator().manual_seed(0)).tolist()
    page_tables = [[free.pop() for _ in range(n)] for n in max_pages]
    embeds = []
    for ids, pixel_values in prompts:
        ids_t = torch.tensor(ids)
        rows = lm.embed(ids_t)
        if pixel_values is not None:
            rows[ids_t == lm.arch.image_token_id] = vision(pixel_values)
        embeds.append(rows)
    kv_lens = [len(ids) for ids, _ in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    x = torch.cat(embeds)  # [total prompt tokens, hidden]
    qo_indptr = np.cumsum([0] + kv_lens).tolist()
    for _ in range(NUM_NEW_TOKENS):
        layout = BatchLayout.from_page_tables(qo_indptr, kv_lens, page_tables, PAGE_SIZE)
        attn.plan(layout)
        hidden = lm(x, torch.tensor(layout.positions()), attn)
        last_rows = torch.tensor(qo_indptr[1:]) - 1
        logits = lm.compute_logits(hidden[last_rows])  # [num_requests, vocab]
        tokens = logits.argmax(-1)
        if margins is not None:
            top2 = logits.topk(2, dim=-1).values
            margins.extend((top2[:, 0] - top2[:, 1]).tolist())
        for out, token in zip(outputs, tokens.tolist(), strict=True):
            out.append(token)
        x = lm.embed(tokens)
        kv_lens = [n + 1 for n in kv_lens]
        qo_indptr = list(range(len(prompts) + 1))
    return outputs


# --- vision ------------------------------------------------------------------------------------


def test_vision_embeddings_match_transformers(vision, hf_model) -> None:
    pixel_values = torch.randn(3, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model.get_image_features(pixel_values=pixel_values).pooler_output  # [3, 256, hidden]
        got = vision(pixel_values)
    assert got.shape == (3 * 256, hf_model.config.text_config.hidden_size)
    torch.testing.assert_close(got, expected.reshape(got.shape), atol=1e-5, rtol=1e-5)


def test_folded_layer_scales_give_the_same_rows(demo_dir, hf_model) -> None:
    """On CUDA in half precision each layer's scales are folded into its output projections (the
    CPU keeps transformers' addcmul); the fold itself, in float32 here, changes nothing but
    rounding. The demo's layer scales are drawn from [0.5, 1], so a missed fold would not pass."""
    vision = load_vision(demo_dir, torch.float32, "cpu")
    pixel_values = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf_model.get_image_features(pixel_values=pixel_values).pooler_output
        for layer in vision.vision_tower.encoder.layer:
            layer.fold_layer_scale()
        got = vision(pixel_values)
    torch.testing.assert_close(got, expected.reshape(got.shape), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("final_norm", [False, True])
def test_residual_adds_fused_into_layer_norms_give_the_same_rows(tmp_path: Path, final_norm: bool) -> None:
    """On CUDA in half precision the encoder hands each residual add to the LayerNorm that reads
    it (`forward_add_norm`; Triton's kernel there, torch's ops here): the same rows as
    transformers, with a final LayerNorm and without (mean pooling). Every add goes through the
    fused op, and a wrong norm in a seam (the demo's norms have random weights) fails by far
    more than rounding."""
    write_demo_model(tmp_path, seed=4, vision_config={"use_mean_pooling": not final_norm})
    vision = load_vision(tmp_path, torch.float32, "cpu")
    encoder = vision.vision_tower.encoder
    calls = []

    def add_norm(*args):
        calls.append(args[2])
        return TORCH_ADD_LAYER_NORM(*args)

    for layer in encoder.layer:
        layer.fold_layer_scale()
    encoder.add_norm = add_norm
    pixel_values = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = _hf_model(tmp_path).get_image_features(pixel_values=pixel_values).pooler_output
        got = vision(pixel_values)
    torch.testing.assert_close(got, expected.reshape(got.shape), atol=1e-5, rtol=1e-5)
    assert len(calls) == 2 * len(encoder.layer) - 1 + final_norm


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback of a machine without a usable GPU kernel")
def test_add_layer_norm_falls_back_to_torch_where_the_kernel_cannot_run(caplog) -> None:
    caplog.set_level("WARNING")
    assert make_add_layer_norm(torch.device("cpu"), torch.bfloat16, 64) is TORCH_ADD_LAYER_NORM
    assert caplog.text == ""
    # CUDA asked for where there is none (or no Triton): the kernel cannot build or run, torch's ops serve.
    assert make_add_layer_norm(torch.device("cuda"), torch.bfloat16, 64) is TORCH_ADD_LAYER_NORM
    assert "residual add + LayerNorm runs (Triton's kernel failed) op by op (" in caplog.text


def test_flashinfer_vit_attention_falls_back_to_sdpa_where_it_cannot_serve(caplog) -> None:
    from vlmd.kernels.vision_attention import SDPA_TILE_ATTENTION, make_tile_attention

    caplog.set_level("INFO")
    assert make_tile_attention("sdpa", torch.device("cpu"), torch.float32, 64) is SDPA_TILE_ATTENTION
    assert make_tile_attention("flashinfer", torch.device("cpu"), torch.float32, 64) is SDPA_TILE_ATTENTION
    assert "ViT attention: torch SDPA (FlashInfer asked for, but not on CUDA)" in caplog.text
    caplog.clear()
    # The default: FlashInfer where it can serve; on the CPU SDPA without a word.
    assert make_tile_attention("auto", torch.device("cpu"), torch.float32, 64) is SDPA_TILE_ATTENTION
    assert caplog.text == ""
    # On CUDA in float32 FlashInfer cannot serve: SDPA, and the log says why.
    assert make_tile_attention("auto", torch.device("cuda"), torch.float32, 64) is SDPA_TILE_ATTENTION
    assert "ViT attention: torch SDPA (FlashInfer by default, but dtype torch.float32 is not" in caplog.text


def test_vision_variants_match_transformers(tmp_path: Path) -> None:
    """InternViT-6B style: RMSNorm, qk-norm, no attention bias and a final LayerNorm."""
    variant = {
        "norm_type": "rms_norm",
        "use_qk_norm": True,
        "attention_bias": False,
        "use_mean_pooling": False,
    }
    write_demo_model(tmp_path, seed=3, vision_config=variant)
    pixel_values = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _hf_model(tmp_path).get_image_features(pixel_values=pixel_values).pooler_output
        got = load_vision(tmp_path, torch.float32, "cpu")(pixel_values)
    torch.testing.assert_close(got, expected.reshape(got.shape), atol=1e-5, rtol=1e-5)


# --- greedy generation -------------------------------------------------------------------------


def test_greedy_generation_matches_transformers(lm, vision, hf_model, tokenizer, images) -> None:
    text_only = _prompt(tokenizer, [], "Describe a sunny street in one sentence.")
    with_image = _prompt(tokenizer, [images["gradient"]], "这是什么？")
    assert with_image[1] is not None and with_image[1].shape[0] >= 3, "want a multi-tile image"
    margins: list[float] = []
    got = _vlmd_greedy(lm, vision, [text_only, with_image], margins)
    assert got[0] == _hf_greedy(hf_model, *text_only)
    assert got[1] == _hf_greedy(hf_model, *with_image)
    # The demo's init keeps argmax decisions clear of float32 noise (logits differ by ~2e-5).
    assert min(margins) > 1e-3, f"a near-tie makes this comparison fragile: {min(margins)}"


def test_prefill_logits_close_to_transformers(lm, vision, hf_model, tokenizer, images) -> None:
    """The margin the greedy comparison relies on: fp32 differences are far below top-1 gaps."""
    ids, pixel_values = _prompt(tokenizer, [images["halves"]], "What is in this picture?")
    with torch.no_grad():
        expected = hf_model(input_ids=torch.tensor([ids]), pixel_values=pixel_values).logits[0]
        embeds = lm.embed(torch.tensor(ids))
        embeds[torch.tensor(ids) == lm.arch.image_token_id] = vision(pixel_values)
        attn = _backend(lm, math.ceil(len(ids) / PAGE_SIZE))
        layout = BatchLayout.from_page_tables(
            [0, len(ids)], [len(ids)], [list(range(math.ceil(len(ids) / PAGE_SIZE)))], PAGE_SIZE
        )
        attn.plan(layout)
        got = lm.compute_logits(lm(embeds, torch.tensor(layout.positions()), attn))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-5)


# --- loader ------------------------------------------------------------------------------------


def _logits(model_dir: Path, ids: list[int]) -> torch.Tensor:
    lm = load_language_model(model_dir, torch.float32, "cpu")
    attn = _backend(lm, math.ceil(len(ids) / PAGE_SIZE))
    layout = BatchLayout.from_page_tables(
        [0, len(ids)], [len(ids)], [list(range(math.ceil(len(ids) / PAGE_SIZE)))], PAGE_SIZE
    )
    attn.plan(layout)
    with torch.no_grad():
        return lm.compute_logits(lm(lm.embed(torch.tensor(ids)), torch.tensor(layout.positions()), attn))


def test_key_layouts_and_tying_load_the_same_model(tmp_path: Path, demo_dir: Path, hf_model) -> None:
    ids = list(range(100, 140))
    reference = _logits(demo_dir, ids)
    for name, options in {
        "legacy": {"key_layout": "legacy"},
        "sharded": {"num_shards": 3},
        "legacy_sharded": {"key_layout": "legacy", "num_shards": 2},
    }.items():
        write_demo_model(tmp_path / name, **options)
        torch.testing.assert_close(_logits(tmp_path / name, ids), reference, atol=0, rtol=0)
    # What transformers' own save_pretrained writes (the legacy layout, as of 5.x) loads too.
    hf_model.save_pretrained(tmp_path / "saved")
    torch.testing.assert_close(_logits(tmp_path / "saved", ids), reference, atol=0, rtol=0)

    tied = {}
    for layout in ("hub", "legacy"):
        write_demo_model(tmp_path / f"tied_{layout}", tie_word_embeddings=True, key_layout=layout)
        tied[layout] = _logits(tmp_path / f"tied_{layout}", ids)
        lm = load_language_model(tmp_path / f"tied_{layout}", torch.float32, "cpu")
        assert lm.lm_head.weight is lm.model.embed_tokens.weight
    # Padded as on CUDA, the head stays tied, and embeddings and logits are unchanged.
    hidden, ids_t = torch.randn(2, lm.arch.hidden_size), torch.tensor(ids)
    before = lm.compute_logits(hidden), lm.embed(ids_t)
    lm.pad_lm_head(64)
    assert lm.lm_head.weight is lm.model.embed_tokens.weight and lm.lm_head.weight.shape[0] % 64 == 0
    torch.testing.assert_close(lm.compute_logits(hidden), before[0], atol=1e-6, rtol=1e-6)
    assert torch.equal(lm.embed(ids_t), before[1])
    torch.testing.assert_close(tied["legacy"], tied["hub"], atol=0, rtol=0)
    with torch.no_grad():
        expected = _hf_model(tmp_path / "tied_hub")(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(tied["hub"], expected, atol=2e-4, rtol=1e-5)


def test_each_component_reads_only_its_own_shard(tmp_path: Path, demo_dir: Path) -> None:
    with safe_open(demo_dir / "model.safetensors", framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    weight_map = {}
    for shard, wants_text in (("vision.safetensors", False), ("text.safetensors", True)):
        part = {k: v for k, v in tensors.items() if _is_text_key(k) == wants_text}
        save_file(part, str(tmp_path / shard), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, shard)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_dir / name, tmp_path / name)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "vision.safetensors").rename(tmp_path / "vision.away")
    load_language_model(tmp_path, torch.float32, "cpu", num_threads=4)
    (tmp_path / "vision.away").rename(tmp_path / "vision.safetensors")
    (tmp_path / "text.safetensors").unlink()
    load_vision(tmp_path, torch.float32, "cpu", num_threads=4)


def _is_text_key(key: str) -> bool:
    return key.startswith("model.language_model.") or key == "lm_head.weight"


def _rewrite_weights(path: Path, edit) -> None:
    with safe_open(path / "model.safetensors", framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_bad_checkpoints_give_clear_errors(tmp_path: Path) -> None:
    write_demo_model(tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.update({"foo.bar": torch.zeros(1)}))
    with pytest.raises(ValueError, match="unrecognised checkpoint keys.*foo.bar"):
        load_vision(tmp_path, torch.float32, "cpu")
    _rewrite_weights(tmp_path, lambda t: t.pop("foo.bar"))
    _rewrite_weights(tmp_path, lambda t: t.pop("model.language_model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing \[model.layers.1.mlp.up_proj.weight\]"):
        load_language_model(tmp_path, torch.float32, "cpu")
    _rewrite_weights(
        tmp_path, lambda t: t.update({"model.vision_tower.encoder.layer.0.mlp.fc1.weight": torch.zeros(3, 3)})
    )
    with pytest.raises(ValueError, match="fc1.weight: checkpoint shape"):
        load_vision(tmp_path, torch.float32, "cpu")


# --- demo model --------------------------------------------------------------------------------


def test_demo_outputs_vary_and_follow_the_image(lm, vision, tokenizer, images) -> None:
    question = "这是什么？"
    runs = {
        "text": _prompt(tokenizer, [], question),
        "halves": _prompt(tokenizer, [images["halves"]], question),
        "gradient": _prompt(tokenizer, [images["gradient"]], question),
        "noise": _prompt(tokenizer, [images["noise"]], question),
        "halves+noise": _prompt(tokenizer, [images["halves"], images["noise"]], question),
        "noise+halves": _prompt(tokenizer, [images["noise"], images["halves"]], question),
    }
    out = dict(zip(runs, _vlmd_greedy(lm, vision, list(runs.values())), strict=True))
    for name, tokens in out.items():
        assert len(set(tokens)) >= 10, f"{name}: greedy output is nearly constant: {tokens}"
    assert (
        out["halves"] != out["gradient"] and out["gradient"] != out["noise"] and out["noise"] != out["halves"]
    )
    assert out["halves"] != out["text"]
    assert out["halves+noise"] != out["noise+halves"]


def test_demo_tokenizer_and_configs(demo_dir: Path, tokenizer) -> None:
    assert tokenizer.context_image_token == "<IMG_CONTEXT>"
    arch = InternVLArch.from_model_dir(demo_dir)
    assert tokenizer.context_image_token_id == arch.image_token_id
    assert (tokenizer.start_image_token, tokenizer.end_image_token, tokenizer.video_token) == (
        "<img>",
        "</img>",
        "<video>",
    )
    assert len({tokenizer.start_image_token_id, tokenizer.end_image_token_id, tokenizer.video_token_id}) == 3
    chat = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "这是什么？"}]},
    ]
    rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\n<IMG_CONTEXT>\n这是什么？<|im_end|>\n<|im_start|>assistant\n"
    )
    # The raw tokenizer.json (what a server may load directly) agrees with transformers.
    raw = Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    for text in (rendered, "It's 2024!  Hello,\n\n world", "<img><IMG_CONTEXT></img>这是"):
        assert raw.encode(text).ids == tokenizer(text)["input_ids"]
    assert tokenizer.decode(tokenizer("这是什么？")["input_ids"]) == "这是什么？"
    assert len(tokenizer) == arch.vocab_size
    processor = AutoImageProcessor.from_pretrained(demo_dir)  # falls back to the PIL backend here
    assert (processor.crop_to_patches, processor.min_patches, processor.max_patches) == (True, 1, 12)
    assert list(processor.image_mean) == IMAGENET_MEAN and processor.size.height == 448
    generation = json.loads((demo_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [
        tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")
    ]
    assert arch.image_seq_length == 256 and arch.rope_theta == 1e6 and not arch.tie_word_embeddings


def test_demo_is_deterministic(tmp_path: Path, demo_dir: Path) -> None:
    write_demo_model(tmp_path)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (demo_dir / name).read_bytes(), name


# --- config ------------------------------------------------------------------------------------


def _config(demo_dir: Path) -> dict:
    return json.loads((demo_dir / "config.json").read_text())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(model_type="llava"), "unsupported model_type 'llava'"),
        (lambda c: c.update(model_type="internvl_chat"), "config.json has no llm_config"),
        (lambda c: c.update(architectures=["InternVLModel"]), "unsupported architectures"),
        (lambda c: c["text_config"].update(model_type="qwen3_moe"), "unsupported language model 'qwen3_moe'"),
        (
            lambda c: c["text_config"].update(rope_parameters={"rope_type": "yarn", "factor": 4.0}),
            "RoPE scaling",
        ),
        (lambda c: c["text_config"].update(attention_bias=True), "attention_bias=true"),
        (lambda c: c.update(vision_feature_layer=-4), "outside the ViT's 2 layers"),
        (lambda c: c.update(image_seq_length=64), "image_seq_length=64"),
    ],
)
def test_unsupported_configs_raise(demo_dir: Path, tmp_path: Path, edit, message: str) -> None:
    config = _config(demo_dir)
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        InternVLArch.from_model_dir(tmp_path)


def test_legacy_config_fields(demo_dir: Path) -> None:
    """Hub configs written by transformers 4.x: rope_theta at the top, torch_dtype, no top-level tie."""
    config = _config(demo_dir)
    text = config["text_config"]
    del text["rope_parameters"], config["dtype"], config["tie_word_embeddings"], text["dtype"]
    text.update(rope_theta=5e5, tie_word_embeddings=True)
    config["torch_dtype"] = "bfloat16"
    config["vision_config"].update(image_size=448, patch_size=14)
    arch = InternVLArch.from_config_dict(config)
    assert (arch.rope_theta, arch.dtype, arch.tie_word_embeddings, arch.image_size) == (
        5e5,
        "bfloat16",
        True,
        448,
    )


def test_set_ops_routes_linear_layers_through_the_ops_gemv():
    """Ops with a `gemv` (Triton's on CUDA) take over every linear layer's forward; the forward
    hooks the tensor-parallel split hangs on row-parallel layers still run on its output; ops
    without one leave F.linear in place."""
    import torch.nn.functional as F
    from torch import nn

    from vlmd.kernels.ops import TorchOps
    from vlmd.models.layers import set_ops

    calls = []

    class RecordingOps(TorchOps):
        def gemv(self, x, weight, bias=None):
            calls.append(weight)
            return F.linear(x, weight, bias)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4, bias=False))
    model[1].register_forward_hook(lambda module, args, out: out * 2)  # as an all-reduce would sum
    x = torch.randn(1, 8)
    want = model(x)
    set_ops(model, TorchOps())  # no gemv: nothing changes
    assert "forward" not in vars(model[0]) and torch.equal(model(x), want)
    set_ops(model, RecordingOps())
    assert torch.equal(model(x), want)
    assert [w is m.weight for w, m in zip(calls, model, strict=True)] == [True, True]
    set_ops(model, TorchOps())  # ops without one again: F.linear is back
    assert torch.equal(model(x), want) and len(calls) == 2


def test_fused_projections_skip_the_random_initialisation(monkeypatch):
    """fuse_linears makes its Linear on the meta device: one made on the CPU first fills a float32
    weight of the fused size with random values (24 of 35 s loading the InternVL3-8B shape), only
    to drop them. The fused layer holds the parts' weights and biases, side by side."""
    from torch import nn

    from vlmd.models.layers import fuse_linears

    parts = [nn.Linear(8, n) for n in (3, 5)]
    initialised = []
    original = nn.Linear.reset_parameters
    monkeypatch.setattr(
        nn.Linear,
        "reset_parameters",
        lambda self: (initialised.append(self.weight.device.type), original(self)),
    )
    fused = fuse_linears(*parts)
    assert initialised == ["meta"]
    assert torch.equal(fused.weight, torch.cat([p.weight for p in parts]))
    assert torch.equal(fused.bias, torch.cat([p.bias for p in parts]))
    x = torch.randn(2, 8)
    torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], dim=1), rtol=1e-6, atol=1e-6)
