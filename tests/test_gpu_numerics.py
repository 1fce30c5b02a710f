"""bf16 on the GPU: vlmd's logits stay as close to the float32 reference as transformers' own bf16.

Teacher-forced: a prompt, then 128 fixed tokens fed one decode step at a time through the paged
KV cache (FlashInfer where it applies); transformers computes all positions in one forward.
"""

from __future__ import annotations

import pytest
import torch
from transformers import InternVLForConditionalGeneration

from vlmd.actors.worker import make_runner
from vlmd.demo import write_demo_model
from vlmd.kernels.attention import BatchLayout
from vlmd.models.config import InternVLArch
from vlmd.models.loader import load_language_model
from vlmd.models.tensor_parallel import SINGLE_RANK, TPGroup

pytestmark = pytest.mark.gpu

NUM_STEPS = 128
PROMPT_LEN = 200
PAGE_SIZE = 16
MID_SIZE = {  # a Qwen2-0.5B-shaped language model
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
}


@pytest.fixture(scope="module", params=["demo", "mid"])
def model_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu-models") / request.param
    write_demo_model(path, seed=0, **({"text_config": MID_SIZE} if request.param == "mid" else {}))
    return path


def token_ids(vocab: int) -> list[int]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (PROMPT_LEN + NUM_STEPS,), generator=generator).tolist()


@torch.inference_mode()
def vlmd_logits(model_dir, ids: list[int], tp: TPGroup = SINGLE_RANK) -> torch.Tensor:
    """[NUM_STEPS + 1, vocab]: logits after the prompt, then after each forced token (with `tp`
    of several ranks, this rank's run of the split model, on GPU `tp.rank`)."""
    arch = InternVLArch.from_model_dir(model_dir)
    model = load_language_model(model_dir, torch.bfloat16, torch.device("cuda", tp.rank), tp=tp)
    num_pages = -(-len(ids) // PAGE_SIZE)
    attn = make_runner(model, arch, num_pages=num_pages, page_size=PAGE_SIZE).attn
    pages = list(range(num_pages))[::-1]  # a non-trivial page order
    rows = []
    spans = [(0, PROMPT_LEN)] + [(t, t + 1) for t in range(PROMPT_LEN, PROMPT_LEN + NUM_STEPS)]
    for start, end in spans:
        layout = BatchLayout.from_page_tables([0, end - start], [end], [pages], PAGE_SIZE)
        attn.plan(layout)
        input_ids = torch.tensor(ids[start:end], device=model.lm_head.weight.device)
        positions = torch.arange(start, end, device=input_ids.device)
        hidden = model.forward(model.embed(input_ids), positions, attn)
        rows.append(model.compute_logits(hidden[-1:]))
    return torch.cat(rows).float()


@torch.inference_mode()
def hf_logits(model_dir, ids: list[int], dtype: torch.dtype) -> torch.Tensor:
    model = InternVLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).cuda().eval()
    logits = model(input_ids=torch.tensor([ids], device="cuda")).logits[0]
    return logits[PROMPT_LEN - 1 : PROMPT_LEN + NUM_STEPS].float()


def test_bf16_logits_deviate_no_more_than_transformers_bf16(model_dir):
    from vlmd.kernels.flashinfer_backend import flashinfer_unsupported_reason

    arch = InternVLArch.from_model_dir(model_dir)
    reason = flashinfer_unsupported_reason(
        arch.head_dim,
        arch.num_attention_heads,
        arch.num_key_value_heads,
        torch.bfloat16,
        torch.device("cuda"),
    )
    assert reason is None, f"this test must exercise FlashInfer: {reason}"
    ids = token_ids(min(arch.vocab_size, 990))
    reference = hf_logits(model_dir, ids, torch.float32)
    hf_bf16 = (hf_logits(model_dir, ids, torch.bfloat16) - reference).abs()
    vlmd = vlmd_logits(model_dir, ids)
    ours = (vlmd - reference).abs()
    print(f"mean abs error: vlmd {ours.mean():.4f}, transformers bf16 {hf_bf16.mean():.4f}")
    print(f"max abs error:  vlmd {ours.max():.4f}, transformers bf16 {hf_bf16.max():.4f}")
    assert ours.mean() <= 1.5 * hf_bf16.mean()
    assert ours.max() <= 1.5 * hf_bf16.max()
    # Greedy choices agree wherever the reference is not near a tie.
    top2 = reference.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 4 * hf_bf16.max()
    assert torch.equal(vlmd.argmax(-1)[clear], reference.argmax(-1)[clear])


# InternViT-300M's layer shape (head_dim 64, so FlashInfer's tile attention can serve it), 4 layers.
VIT_MID = {"hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 4096, "num_hidden_layers": 4}


@pytest.mark.parametrize("attention", ["sdpa", "flashinfer"])
@torch.inference_mode()
def test_bf16_vision_rows_deviate_no_more_than_transformers_bf16(tmp_path, attention):
    """The ViT in bf16 on CUDA (patch GEMM, folded layer scales, residual adds fused into the
    LayerNorms after them by Triton, GELU in the GEMM epilogue, either attention kernel) against
    the float32 reference, next to transformers' own bf16 rows, on three tiles."""
    from vlmd.kernels.add_norm import TritonAddLayerNorm
    from vlmd.kernels.vision_attention import SDPA_TILE_ATTENTION, make_tile_attention
    from vlmd.models.loader import load_vision

    write_demo_model(tmp_path, seed=0, vision_config=VIT_MID)
    pixels = torch.randn(3, 3, 448, 448, generator=torch.Generator().manual_seed(0)).cuda()

    def hf_rows(dtype: torch.dtype) -> torch.Tensor:
        hf = InternVLForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype).cuda().eval()
        rows = hf.model.get_image_features(pixel_values=pixels.to(dtype))
        return getattr(rows, "pooler_output", rows).reshape(-1, hf.config.text_config.hidden_size).float()

    reference = hf_rows(torch.float32)
    hf_bf16 = (hf_rows(torch.bfloat16) - reference).abs()
    vision = load_vision(tmp_path, torch.bfloat16, torch.device("cuda"))
    assert isinstance(vision.vision_tower.encoder.add_norm, TritonAddLayerNorm)
    tile_attention = make_tile_attention(attention, torch.device("cuda"), torch.bfloat16, 64)
    assert (tile_attention is SDPA_TILE_ATTENTION) == (attention == "sdpa")
    vision.set_tile_attention(tile_attention)
    ours = (vision(pixels.bfloat16()).float() - reference).abs()
    print(f"vision rows, mean abs error: vlmd {ours.mean():.5f}, transformers bf16 {hf_bf16.mean():.5f}")
    assert ours.mean() <= 1.5 * hf_bf16.mean()
    assert ours.max() <= 1.5 * hf_bf16.max()
