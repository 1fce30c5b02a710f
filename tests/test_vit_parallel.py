"""The ViT layouts: --visual_tp splits InternViT's heads and MLP over ranks (gloo on the CPU),
--visual_dp runs whole replicas; both give one rank's embeddings and transformers' tokens."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlmd.demo import write_demo_model
from vlmd.models.loader import load_vision
from vlmd.models.tensor_parallel import TPGroup

# InternViT-6B's variant: RMSNorm blocks, qk-norm across all heads, no qkv bias, a final LayerNorm.
VIT_6B_LIKE = {
    "use_qk_norm": True,
    "norm_type": "rms_norm",
    "attention_bias": False,
    "use_mean_pooling": False,
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pixels() -> torch.Tensor:
    return torch.randn(3, 3, 448, 448, generator=torch.Generator().manual_seed(0))  # [tiles, 3, H, W]


def _sharded_vit_main(rank: int, size: int, port: int, model_dir: str, result_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        with torch.inference_mode():
            rows = load_vision(model_dir, torch.float32, "cpu", tp=TPGroup(rank, size))(_pixels())
        if rank == 0:
            torch.save(rows, result_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("variant", "size"), [("demo", 2), ("demo", 4), ("vit_6b_like", 2)])
def test_sharded_vit_gives_the_single_rank_rows(model_dir, tmp_path, variant, size):
    if variant == "vit_6b_like":
        model_dir = tmp_path / "model"
        write_demo_model(model_dir, seed=5, vision_config=VIT_6B_LIKE)
    with torch.inference_mode():
        want = load_vision(model_dir, torch.float32, "cpu")(_pixels())  # [tiles * 256, hidden]
    path = str(tmp_path / "rows.pt")
    mp.spawn(_sharded_vit_main, args=(size, _free_port(), str(model_dir), path), nprocs=size)
    torch.testing.assert_close(torch.load(path), want, rtol=1e-5, atol=1e-5)


def test_sharded_vit_holds_only_its_share(model_dir):
    model = load_vision(model_dir, torch.float32, "cpu", tp=TPGroup(1, 2))  # no collective runs at load
    whole = load_vision(model_dir, torch.float32, "cpu")
    attn, mlp = model.vision_tower.encoder.layer[0].attention, model.vision_tower.encoder.layer[0].mlp
    ref_attn = whole.vision_tower.encoder.layer[0].attention
    hidden = model.arch.vision_hidden_size
    assert attn.num_heads == model.arch.vision_num_attention_heads // 2
    assert attn.qkv_proj.weight.shape == (3 * hidden // 2, hidden)
    q_rows = ref_attn.qkv_proj.weight[hidden // 2 : hidden]  # rank 1 holds the second half of the heads
    torch.testing.assert_close(attn.qkv_proj.weight[: hidden // 2], q_rows, rtol=0, atol=0)
    assert mlp.fc1.weight.shape[0] == mlp.fc2.weight.shape[1] == model.arch.vision_intermediate_size // 2
    assert attn.projection_layer.bias.shape == (hidden,)  # added once, after the all-reduce
