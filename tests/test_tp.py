"""Tensor parallelism on the CPU (gloo): --tp 2 (with the ViT split too, --visual_tp 2) gives
transformers' tokens through the real server, KV heads replicate when there are fewer than ranks,
and a dead rank stops the server."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import free_port, start_server
from tests.test_lifecycle import assert_one_line_error, kill_actor_and_expect_clean_stop, serve
from tests.test_parity import (
    CASES,
    IMG_B,
    IMG_C,
    chat,
    hf_prompt,
    vlmd_generate,
)
from vlmd.actors.worker import make_runner
from vlmd.core.request import Request
from vlmd.core.scheduler import Scheduler, SchedulerConfig
from vlmd.kernels.ops import TorchOps
from vlmd.messages import SamplingParams
from vlmd.models.config import InternVLArch
from vlmd.models.loader import load_language_model
from vlmd.models.tensor_parallel import TPGroup, end_rank_process
from vlmd.runner import run_in_process


@pytest.fixture(scope="module")
def tp2_server(model_dir, tmp_path_factory):
    server = start_server(
        model_dir,
        tmp_path_factory.mktemp("tp2"),
        *("--tp", "2", "--visual_tp", "2", "--enable_multimodal"),
        *("--tp_all_reduce", "fused"),  # a GPU option: on the CPU the ranks say so and use gloo
    )
    yield server
    assert server.stop() == 0
    assert server.actor_pids() == [] and server.shm_segments() == []


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_greedy_tokens_equal_transformers(tp2_server, reference, case):
    prompt, _, images = CASES[case]
    assert vlmd_generate(tp2_server, prompt, images) == reference.generate(hf_prompt(prompt), images)
    # scheduler, two workers, two vision ranks (one ViT), a preprocess worker, http
    assert len(tp2_server.actor_pids()) == 7


def test_tp2_seeded_sampling_draws_the_single_rank_tokens(tp2_server, text_server):
    """Every rank draws the same token from the same noise, and the tokens are those of one rank."""
    from tests.test_sampling_api import PROMPT, SEEDED

    tp2 = vlmd_generate(tp2_server, PROMPT, [], 24, do_sample=True, **SEEDED)
    assert tp2 == vlmd_generate(text_server, PROMPT, [], 24, do_sample=True, **SEEDED)
    assert tp2 != vlmd_generate(text_server, PROMPT, [], 24)  # it does sample


def test_gpu_all_reduce_options_fall_back_to_gloo_on_the_cpu(tp2_server):
    assert "--tp_all_reduce fused needs GPUs: the ranks sum with gloo" in tp2_server.log()


def test_tp2_batched_requests_equal_transformers(tp2_server, reference):
    from concurrent.futures import ThreadPoolExecutor

    batch = [
        (chat("Hi."), [], 33),
        (chat("<img></img> Describe."), [IMG_C], 34),
        (chat("<image>?"), [IMG_B], 35),
    ]
    expected = [reference.generate(hf_prompt(p), imgs, n) for p, imgs, n in batch]
    with ThreadPoolExecutor(len(batch)) as pool:
        assert list(pool.map(lambda r: vlmd_generate(tp2_server, *r), batch)) == expected


# --- ranks in process: every layout of heads ----------------------------------------------------


def _greedy(
    model_dir: str, tp: TPGroup, prompts: list[list[int]], num_tokens: int, pad_lm_head: bool = False
) -> dict[str, list[int]]:
    arch = InternVLArch.from_model_dir(model_dir)
    model = load_language_model(model_dir, torch.float32, "cpu", tp=tp)
    if pad_lm_head:  # as on CUDA: zero rows under each rank's share of the vocabulary
        model.pad_lm_head()
        assert model.lm_head.weight.shape[0] % 64 == 0
    runner = make_runner(model, arch, num_pages=64, page_size=16)
    scheduler = Scheduler(SchedulerConfig(64, 16))
    for i, prompt in enumerate(prompts):
        scheduler.add(Request(f"r{i}", prompt, SamplingParams(max_new_tokens=num_tokens, ignore_eos=True)))
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    for _, outputs in run_in_process(scheduler, runner):
        for token_out in outputs:
            out[token_out.request_id] += token_out.token_ids
    return out


def _rank_main(
    rank: int, size: int, port: int, model_dir: str, prompts, result_path: str, pad_lm_head: bool = False
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    tokens = _greedy(model_dir, TPGroup(rank, size), prompts, 20, pad_lm_head)
    if rank == 0:
        torch.save(tokens, result_path)
    end_rank_process(size)


@pytest.mark.parametrize("size", [2, 4])  # the demo model has 2 KV heads: 4 ranks replicate them
def test_every_rank_count_gives_the_single_rank_tokens(model_dir, tmp_path, size):
    prompts = [list(range(5, 40)), list(range(100, 107)), list(range(300, 390))]
    want = _greedy(str(model_dir), TPGroup(), prompts, 20)
    path = str(tmp_path / "tokens.pt")
    mp.spawn(_rank_main, args=(size, free_port(), str(model_dir), prompts, path), nprocs=size)
    assert torch.load(path) == want


@pytest.mark.parametrize("size", [2, 4])
def test_phi3_packed_projections_split_over_ranks(tmp_path, size):
    """Phi-3 as OpenGVLab publishes it (q/k/v in one qkv_proj, gate/up in one gate_up_proj): each
    rank reads its rows of the packed tensors, KV heads replicated at 4 ranks, and the tokens are
    one rank's (which are transformers': tests/test_backbones.py)."""
    from vlmd.demo import write_demo_model
    from vlmd.demo_opengvlab import hf_demo_options, write_opengvlab_model

    write_demo_model(tmp_path / "hf", seed=4, **hf_demo_options("phi3"))
    write_opengvlab_model(tmp_path / "hf", tmp_path / "og", "phi3")
    model_dir = str(tmp_path / "og")
    prompts = [list(range(5, 40)), list(range(100, 107)), list(range(300, 390))]
    want = _greedy(model_dir, TPGroup(), prompts, 20)
    path = str(tmp_path / "tokens.pt")
    mp.spawn(_rank_main, args=(size, free_port(), model_dir, prompts, path), nprocs=size)
    assert torch.load(path) == want


def test_padded_lm_head_gives_the_unpadded_tokens(model_dir, tmp_path):
    """The CUDA layout of the LM head (zero rows up to a multiple of 64: the demo's 1000-token
    vocabulary becomes 1024 rows, each rank's 500 become 512) on one rank and on two."""
    model = load_language_model(model_dir, torch.float32, "cpu")
    hidden = torch.randn(3, model.arch.hidden_size)
    logits = model.compute_logits(hidden)
    model.pad_lm_head()
    assert model.lm_head.weight.shape[0] == 1024 and model.compute_logits(hidden).shape == (3, 1000)
    torch.testing.assert_close(model.compute_logits(hidden), logits, rtol=1e-6, atol=1e-6)
    prompts = [list(range(5, 40)), list(range(300, 390))]
    want = _greedy(str(model_dir), TPGroup(), prompts, 20)
    assert _greedy(str(model_dir), TPGroup(), prompts, 20, pad_lm_head=True) == want
    path = str(tmp_path / "tokens.pt")
    mp.spawn(_rank_main, args=(2, free_port(), str(model_dir), prompts, path, True), nprocs=2)
    assert torch.load(path) == want


class GlooFusedNorm:
    """The contract of `TPGroup.fused_norm` on gloo: sum the unsummed rows, then transformers'
    add-RMSNorm, so the fused path must give the unfused path's tokens exactly. Steps of up to
    `max_tokens` rows take it (decodes), longer ones (prefills) the hooks' all-reduce."""

    calls = 0

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens

    def fits(self, x: torch.Tensor) -> bool:
        return x.shape[0] <= self.max_tokens

    def __call__(self, x, residual, weight, eps):
        type(self).calls += 1
        dist.all_reduce(x)
        return TorchOps().add_rms_norm(x, residual, weight, eps)


def _fused_rank_main(rank: int, size: int, port: int, model_dir: str, prompts, result_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    tokens = _greedy(model_dir, TPGroup(rank, size, fused_norm=GlooFusedNorm(8)), prompts, 20)
    if rank == 0:
        torch.save({"tokens": tokens, "calls": GlooFusedNorm.calls}, result_path)
    end_rank_process(size)


def test_all_reduce_deferred_to_the_norm_gives_the_single_rank_tokens(model_dir, tmp_path):
    """With a fused all-reduce, o_proj and down_proj hand small outputs to the add-RMSNorm after
    them unsummed (every layer's two norms and the final one take them); longer steps still sum
    in the hooks."""
    prompts = [list(range(5, 40)), list(range(100, 107)), list(range(300, 390))]
    want = _greedy(str(model_dir), TPGroup(), prompts, 20)
    path = str(tmp_path / "tokens.pt")
    mp.spawn(_fused_rank_main, args=(2, free_port(), str(model_dir), prompts, path), nprocs=2)
    result = torch.load(path)
    assert result["tokens"] == want
    num_layers = InternVLArch.from_model_dir(model_dir).num_hidden_layers
    # Every one of the 19 decode steps (3 rows) takes the fused path in each of its norms.
    assert result["calls"] >= 19 * 2 * num_layers


# --- start-up checks and failure ----------------------------------------------------------------


def test_tp_that_does_not_divide_the_heads_is_refused(model_dir):
    result = serve("--model_dir", str(model_dir), "--tp", "3")
    assert_one_line_error(result, "--tp")
    assert "num_attention_heads" in result.stderr


def test_tp_alone_puts_the_vit_in_tensor_parallel_and_inconsistent_layouts_are_refused(model_dir):
    import argparse

    from vlmd.config import ConfigError, add_serve_arguments, build_server_args

    def args(*flags: str):
        parser = argparse.ArgumentParser()
        add_serve_arguments(parser)
        return build_server_args(parser.parse_args(["--model_dir", str(model_dir), *flags]), environ={})

    assert (args("--tp", "2").visual_tp, args("--tp", "2").visual_dp) == (2, 1)
    assert (
        args("--tp", "2", "--visual_dp", "2").visual_tp,
        args("--tp", "2", "--visual_tp", "1").visual_dp,
    ) == (
        1,
        2,
    )
    for flags in (("--tp", "2", "--visual_dp", "2", "--visual_tp", "2"), ("--tp", "4", "--visual_dp", "3")):
        with pytest.raises(ConfigError, match="visual_dp \\* visual_tp must equal tp"):
            args(*flags)


def test_a_dead_rank_stops_the_server_cleanly(model_dir, tmp_path):
    server = start_server(model_dir, tmp_path, "--tp", "2", "--enable_multimodal")
    kill_actor_and_expect_clean_stop(server, "worker", 1)


def test_a_rank_dying_mid_step_does_not_hang_shutdown(model_dir, tmp_path):
    """Rank 0 is mid-step, in or about to enter an all-reduce with a rank that is gone: the
    server still stops (within the wait below) and leaves nothing behind."""
    import threading

    import requests

    server = start_server(model_dir, tmp_path, "--tp", "2")
    body = {"inputs": "a long answer", "parameters": {"max_new_tokens": 3000, "ignore_eos": True}}
    threading.Thread(
        target=lambda: requests.post(server.url + "/generate", json=body, timeout=120), daemon=True
    ).start()
    deadline = time.monotonic() + 30
    while "vlmd_requests_running 1" not in requests.get(server.url + "/metrics").text:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.1)
    kill_actor_and_expect_clean_stop(server, "worker", 1)


# --- sharded loading ------------------------------------------------------------------------------


class _CountingFile:
    """A safetensors file handle that counts the bytes of every tensor it materializes."""

    def __init__(self, handle, counts: dict[str, int]) -> None:
        self.handle, self.counts = handle, counts

    def __enter__(self):
        self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def keys(self):
        return self.handle.keys()

    def get_tensor(self, key: str) -> torch.Tensor:
        tensor = self.handle.get_tensor(key)
        self.counts[key] = self.counts.get(key, 0) + tensor.numel() * tensor.element_size()
        return tensor

    def get_slice(self, key: str):
        counts, inner = self.counts, self.handle.get_slice(key)

        class Slice:
            def __getitem__(self, index):
                tensor = inner[index]
                counts[key] = counts.get(key, 0) + tensor.numel() * tensor.element_size()
                return tensor

        return Slice()


def test_each_rank_reads_only_its_slices(model_dir, monkeypatch):
    import safetensors

    from vlmd.models import loader

    counts: dict[str, int] = {}
    monkeypatch.setattr(
        loader, "safe_open", lambda *a, **kw: _CountingFile(safetensors.safe_open(*a, **kw), counts)
    )
    load_language_model(model_dir, torch.float32, "cpu")
    whole, counts = dict(counts), {}
    for rank in range(2):
        counts.clear()
        model = load_language_model(model_dir, torch.float32, "cpu", tp=TPGroup(rank, 2))
        for key, num_bytes in counts.items():
            if key.endswith(("proj.weight", "proj.bias", "embed_tokens.weight", "lm_head.weight")):
                assert num_bytes * 2 == whole[key], (
                    f"rank {rank} read {num_bytes} of {whole[key]} bytes of {key}"
                )
            else:  # norms are replicated
                assert num_bytes == whole[key], key
        assert sum(counts.values()) < 0.6 * sum(whole.values())
        assert (
            model.model.layers[0].self_attn.num_heads
            == InternVLArch.from_model_dir(model_dir).num_attention_heads // 2
        )
