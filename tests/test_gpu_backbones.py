"""Every backbone on the GPU path (FlashInfer, CUDA graphs, the Triton GEMV): bf16 logits within
the bound of tests/test_gpu_numerics.py against transformers on the HF-native weights, graphs
identical to eager, and an OpenGVLab checkpoint served on CUDA; InternViT-6B's layer kind too."""

from __future__ import annotations

import base64

import pytest
import requests
import torch
from transformers import InternVLForConditionalGeneration

from tests.conftest import make_image, start_server
from tests.test_cuda_graphs import NUM_PAGES, PAGE_SIZE, generate
from tests.test_gpu_numerics import hf_logits, token_ids, vlmd_logits
from vlmd.actors.worker import make_runner
from vlmd.demo import write_demo_model
from vlmd.demo_opengvlab import hf_demo_options, write_opengvlab_model
from vlmd.models.config import InternVLArch
from vlmd.models.loader import load_language_model

pytestmark = pytest.mark.gpu

# (backbone, the layout the server loads); the reference is transformers on the HF-native dir.
CASES = [
    ("llama", "hf"),
    ("qwen3", "hf"),
    ("qwen2", "opengvlab"),
    ("internlm2", "opengvlab"),
    ("llama", "opengvlab"),
    ("qwen3", "opengvlab"),
    ("phi3", "opengvlab"),  # LongRoPE: the rotary op by op in torch on the GPU too
]


@pytest.fixture(scope="module", params=CASES, ids=[f"{b}-{layout}" for b, layout in CASES])
def dirs(request, tmp_path_factory):
    """(HF-native reference dir, the dir vlmd loads)."""
    backbone, layout = request.param
    root = tmp_path_factory.mktemp(f"{backbone}-{layout}")
    write_demo_model(root / "hf", seed=0, **hf_demo_options(backbone))
    if layout == "hf":
        return root / "hf", root / "hf"
    write_opengvlab_model(root / "hf", root / "og", backbone)
    return root / "hf", root / "og"


def test_bf16_logits_deviate_no_more_than_transformers_bf16(dirs):
    hf_dir, model_dir = dirs
    arch = InternVLArch.from_model_dir(model_dir)
    ids = token_ids(min(arch.vocab_size, 990))
    reference = hf_logits(hf_dir, ids, torch.float32)
    hf_bf16 = (hf_logits(hf_dir, ids, torch.bfloat16) - reference).abs()
    ours = (vlmd_logits(model_dir, ids) - reference).abs()
    print(
        f"{arch.text_family}: mean abs error vlmd {ours.mean():.4f}, transformers bf16 {hf_bf16.mean():.4f}"
    )
    assert ours.mean() <= 1.5 * hf_bf16.mean()
    assert ours.max() <= 1.5 * hf_bf16.max()


@pytest.mark.parametrize("batch", [1, 5])
def test_graphs_on_and_off_give_identical_tokens(dirs, batch):
    """Batch 1 runs every linear layer through the Triton GEMV, inside the graph too."""
    _, model_dir = dirs
    arch = InternVLArch.from_model_dir(model_dir)
    model = load_language_model(model_dir, torch.bfloat16, torch.device("cuda"))
    generator = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, 990, (int(n),), generator=generator).tolist() for n in (37, 120, 9, 64, 200)]
    prompts = prompts[:batch]
    eager = make_runner(model, arch, num_pages=NUM_PAGES, page_size=PAGE_SIZE)
    graphed = make_runner(model, arch, num_pages=NUM_PAGES, page_size=PAGE_SIZE, graph_max_batch_size=8)
    want, _ = generate(eager, prompts, 24, max_in_flight=1)
    got, replays = generate(graphed, prompts, 24)
    assert got == want and replays == 23


def test_opengvlab_internlm2_checkpoint_served_on_cuda(tmp_path):
    """The seed's flags on an InternLM2 checkpoint as OpenGVLab publishes it, on the GPU."""
    write_demo_model(tmp_path / "hf", seed=0, **hf_demo_options("internlm2"))
    write_opengvlab_model(tmp_path / "hf", tmp_path / "og", "internlm2", num_shards=2)
    server = start_server(
        tmp_path / "og",
        tmp_path,
        *("--trust_remote_code", "--enable_multimodal", "--mem_fraction", "0.5", "--device", "cuda"),
        env={"INTERNVL_IMAGE_LENGTH": "256", "LOADWORKER": "4"},
    )
    try:
        image = base64.b64encode(make_image(900, 600, seed=1)).decode()
        body = {
            "inputs": "<|im_start|>user\n<img></img>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n",
            "parameters": {"max_new_tokens": 32, "ignore_eos": True},
            "multimodal_params": {"images": [{"type": "base64", "data": image}]},
        }
        first = requests.post(server.url + "/generate", json=body, timeout=300)
        second = requests.post(server.url + "/generate", json=body, timeout=300)
        assert first.status_code == 200, first.text
        assert first.json() == second.json() and first.json()["count_output_tokens"] == 32
        chat = requests.post(
            server.url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8},
            timeout=300,
        )
        assert chat.status_code == 200, chat.text
        log = server.log()
        assert "attention backend: FlashInfer" in log and "captured" in log
    finally:
        assert server.stop() == 0
    assert server.actor_pids() == [] and server.shm_segments() == []


# InternViT-6B's kind of layer (RMSNorm, q/k norm across all heads, no q/k/v bias), 4 layers.
VIT_6B_MID = {
    "hidden_size": 1024,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "num_hidden_layers": 4,
    "norm_type": "rms_norm",
    "use_qk_norm": True,
    "attention_bias": False,
}


@torch.inference_mode()
def test_bf16_internvit_6b_rows_deviate_no_more_than_transformers_bf16(tmp_path):
    from vlmd.models.loader import load_vision

    write_demo_model(tmp_path / "hf", seed=0, vision_config=VIT_6B_MID)
    write_opengvlab_model(tmp_path / "hf", tmp_path / "og", "qwen2")
    pixels = torch.randn(3, 3, 448, 448, generator=torch.Generator().manual_seed(0)).cuda()

    def hf_rows(dtype: torch.dtype) -> torch.Tensor:
        hf = InternVLForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=dtype).cuda().eval()
        rows = hf.model.get_image_features(pixel_values=pixels.to(dtype))
        return getattr(rows, "pooler_output", rows).reshape(-1, hf.config.text_config.hidden_size).float()

    reference = hf_rows(torch.float32)
    hf_bf16 = (hf_rows(torch.bfloat16) - reference).abs()
    vision = load_vision(tmp_path / "og", torch.bfloat16, torch.device("cuda"))
    ours = (vision(pixels.bfloat16()).float() - reference).abs()
    print(
        f"InternViT-6B rows, mean abs error: vlmd {ours.mean():.5f}, transformers bf16 {hf_bf16.mean():.5f}"
    )
    assert ours.mean() <= 1.5 * hf_bf16.mean()
    assert ours.max() <= 1.5 * hf_bf16.max()
