"""Tensor parallelism on two GPUs (NCCL): the split model's bf16 logits stay within the bf16
bound of the GPU numerics test, and CUDA graphs with collectives inside give the eager tokens."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import free_port
from tests.test_gpu_numerics import MID_SIZE, hf_logits, token_ids, vlmd_logits
from vlmd.actors.worker import make_runner
from vlmd.core.request import Request
from vlmd.core.scheduler import Scheduler, SchedulerConfig
from vlmd.demo import write_demo_model
from vlmd.kernels.collectives import FusedAllReduceNorm, SymmMemAllReduce
from vlmd.messages import SamplingParams
from vlmd.models.config import InternVLArch
from vlmd.models.loader import load_language_model
from vlmd.models.tensor_parallel import TPGroup, end_rank_process
from vlmd.runner import run_in_process

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices"
    ),
]

NUM_PAGES = 1024
PAGE_SIZE = 16


def _spawn(fn, *args) -> None:
    mp.spawn(_rank_main, args=(fn, free_port(), *args), nprocs=2)


def _rank_main(rank: int, fn, port: int, *args) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    fn(TPGroup(rank, 2), *args)  # an exception ends this rank, and mp.spawn ends the other
    end_rank_process(2)


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu-tp") / "mid"
    write_demo_model(path, seed=0, text_config=MID_SIZE)
    return path


def _logits_rank(tp: TPGroup, model_dir, ids, out_path) -> None:
    logits = vlmd_logits(model_dir, ids, tp)
    if tp.rank == 0:
        torch.save(logits.cpu(), out_path)


def test_tp2_bf16_logits_within_the_bf16_bound(mid_model, tmp_path):
    arch = InternVLArch.from_model_dir(mid_model)
    ids = token_ids(min(arch.vocab_size, 990))
    path = str(tmp_path / "tp2.pt")
    _spawn(_logits_rank, str(mid_model), ids, path)
    tp2 = torch.load(path).cuda()
    tp1 = vlmd_logits(mid_model, ids)
    reference = hf_logits(mid_model, ids, torch.float32)
    hf_bf16 = (hf_logits(mid_model, ids, torch.bfloat16) - reference).abs()
    ours = (tp2 - reference).abs()
    print(
        f"mean abs error: tp2 {ours.mean():.4f}, tp1 {(tp1 - reference).abs().mean():.4f}, "
        f"transformers bf16 {hf_bf16.mean():.4f}; tp2 vs tp1 {(tp2 - tp1).abs().mean():.4f}"
    )
    assert ours.mean() <= 1.5 * hf_bf16.mean()
    assert ours.max() <= 1.5 * hf_bf16.max()
    assert (tp2 - tp1).abs().mean() <= hf_bf16.mean()


def _greedy_tokens(model, arch, prompts, graphs: int) -> dict[str, list[int]]:
    runner = make_runner(model, arch, num_pages=NUM_PAGES, page_size=PAGE_SIZE, graph_max_batch_size=graphs)
    scheduler = Scheduler(SchedulerConfig(NUM_PAGES, PAGE_SIZE))
    for i, prompt in enumerate(prompts):
        scheduler.add(Request(f"r{i}", prompt, SamplingParams(max_new_tokens=24, ignore_eos=True)))
    tokens: dict[str, list[int]] = {}
    for _, outputs in run_in_process(scheduler, runner):
        for out in outputs:
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    return tokens


def _greedy_rank(tp: TPGroup, model_dir, prompts, out_path) -> None:
    arch = InternVLArch.from_model_dir(model_dir)
    model = load_language_model(model_dir, torch.bfloat16, torch.device("cuda", tp.rank), tp=tp)
    results = {graphs: _greedy_tokens(model, arch, prompts, graphs) for graphs in (0, 16)}
    if tp.rank == 0:
        torch.save(results, out_path)


def test_tp2_graphs_with_collectives_give_the_eager_tokens(mid_model, tmp_path):
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 990, (int(n),), generator=generator).tolist() for n in (9, 150, 41)]
    path = str(tmp_path / "greedy.pt")
    _spawn(_greedy_rank, str(mid_model), prompts, path)
    results = torch.load(path)
    assert results[16] == results[0]
    assert all(len(tokens) == 24 for tokens in results[0].values())


class CountingSymmMemAllReduce(SymmMemAllReduce):
    calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return super().__call__(x)


def _symm_mem_rank(tp: TPGroup, model_dir, ids, prompts, out_path) -> None:
    symm = TPGroup(tp.rank, tp.size, CountingSymmMemAllReduce(torch.device("cuda", tp.rank), 1 << 20))
    out = {"nccl_logits": vlmd_logits(model_dir, ids, tp), "symm_logits": vlmd_logits(model_dir, ids, symm)}
    arch = InternVLArch.from_model_dir(model_dir)
    for name, group, graphs in (("nccl_tokens", tp, 0), ("symm_graph_tokens", symm, 16)):
        # The row-parallel layers sum through the group the model was split with.
        model = load_language_model(model_dir, torch.bfloat16, torch.device("cuda", tp.rank), tp=group)
        out[name] = _greedy_tokens(model, arch, prompts, graphs)
    out["symm_calls"] = CountingSymmMemAllReduce.calls
    if tp.rank == 0:
        torch.save({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in out.items()}, out_path)


def test_tp2_symm_mem_all_reduce_gives_the_nccl_results(mid_model, tmp_path):
    """--tp_all_reduce symm_mem: two addends are rounded once either way, so the logits and the
    tokens (CUDA graphs with the symmetric-memory kernel inside) equal NCCL's exactly."""
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 990, (int(n),), generator=generator).tolist() for n in (9, 150, 41)]
    arch = InternVLArch.from_model_dir(mid_model)
    path = str(tmp_path / "symm.pt")
    _spawn(_symm_mem_rank, str(mid_model), token_ids(min(arch.vocab_size, 990)), prompts, path)
    out = torch.load(path)
    assert out["symm_calls"] > 0
    assert torch.equal(out["symm_logits"], out["nccl_logits"])
    assert out["symm_graph_tokens"] == out["nccl_tokens"]


class CountingFusedAllReduceNorm(FusedAllReduceNorm):
    calls = 0

    def __call__(self, *args):
        type(self).calls += 1
        return super().__call__(*args)


def _fused_rank(tp: TPGroup, model_dir, ids, prompts, out_path) -> None:
    arch = InternVLArch.from_model_dir(model_dir)
    fused = CountingFusedAllReduceNorm(tp.rank, tp.size, 256, arch.hidden_size, torch.bfloat16)
    group = TPGroup(tp.rank, tp.size, fused_norm=fused)
    out = {"logits": vlmd_logits(model_dir, ids, group).cpu()}
    model = load_language_model(model_dir, torch.bfloat16, torch.device("cuda", tp.rank), tp=group)
    out["eager_tokens"] = _greedy_tokens(model, arch, prompts, 0)
    out["graph_tokens"] = _greedy_tokens(model, arch, prompts, 16)
    # One request: its decode steps run the one-row GEMVs, launched (as the fused kernel is) as
    # programmatic dependents, back to back inside the graph.
    out["eager_tokens_b1"] = _greedy_tokens(model, arch, prompts[:1], 0)
    out["graph_tokens_b1"] = _greedy_tokens(model, arch, prompts[:1], 16)
    out["calls"] = CountingFusedAllReduceNorm.calls
    if tp.rank == 0:
        torch.save(out, out_path)


def test_tp2_fused_all_reduce_norm_within_the_bf16_bound(mid_model, tmp_path):
    """--tp_all_reduce fused: the sum accumulates in float32 inside the norm's kernel, so the
    logits differ from NCCL's by rounding: they must stay within the bf16 bound against float32
    transformers, and CUDA graphs with the fused kernel inside must give the eager tokens (at
    batch 3, and at batch 1 with the GEMVs)."""
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 990, (int(n),), generator=generator).tolist() for n in (9, 150, 41)]
    arch = InternVLArch.from_model_dir(mid_model)
    ids = token_ids(min(arch.vocab_size, 990))
    path = str(tmp_path / "fused.pt")
    _spawn(_fused_rank, str(mid_model), ids, prompts, path)
    out = torch.load(path)
    assert out["calls"] > 0
    reference = hf_logits(mid_model, ids, torch.float32)
    hf_bf16 = (hf_logits(mid_model, ids, torch.bfloat16) - reference).abs()
    ours = (out["logits"].cuda() - reference).abs()
    assert ours.mean() <= 1.5 * hf_bf16.mean()
    assert ours.max() <= 1.5 * hf_bf16.max()
    assert out["graph_tokens"] == out["eager_tokens"]
    assert all(len(tokens) == 24 for tokens in out["eager_tokens"].values())
    assert out["graph_tokens_b1"] == out["eager_tokens_b1"] and len(out["eager_tokens_b1"]["r0"]) == 24
