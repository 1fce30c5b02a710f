"""Decode steps replayed from CUDA graphs give exactly the tokens of op-by-op execution."""

from __future__ import annotations

import pytest
import torch

from vlmd.actors.worker import make_runner
from vlmd.core.request import Request
from vlmd.core.scheduler import Scheduler, SchedulerConfig
from vlmd.messages import SamplingParams
from vlmd.models.config import InternVLArch
from vlmd.models.loader import load_language_model
from vlmd.runner import run_in_process

pytestmark = pytest.mark.gpu

PAGE_SIZE = 16
NUM_PAGES = 4096


def generate(
    runner, prompts: list[list[int]], num_tokens: int, max_in_flight: int = 2, sampling: dict | None = None
) -> tuple[dict[str, list[int]], int]:
    """Tokens per request (greedy, or sampled with `sampling` and seed i for request i), driven by
    the real scheduler with steps planned ahead as the server does; also how many steps replayed
    a graph."""
    scheduler = Scheduler(SchedulerConfig(NUM_PAGES, PAGE_SIZE))
    for i, prompt in enumerate(prompts):
        knobs = {} if sampling is None else sampling | {"seed": i}
        params = SamplingParams(max_new_tokens=num_tokens, ignore_eos=True, **knobs)
        scheduler.add(Request(f"r{i}", prompt, params))
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    replays = 0
    for plan, outputs in run_in_process(scheduler, runner, max_in_flight):
        replays += bool(runner.graphs is not None and runner._graph_step(plan.items))
        for out in outputs:
            tokens[out.request_id] += out.token_ids
    return tokens, replays


@pytest.fixture(scope="module")
def model_and_arch(model_dir):
    arch = InternVLArch.from_model_dir(model_dir)
    return load_language_model(model_dir, torch.bfloat16, torch.device("cuda")), arch


@pytest.mark.parametrize(
    "batch,lengths",
    [(1, (5, 300)), (3, (5, 300)), (16, (5, 300)), (64, (100, 120)), (64, (5, 150)), (70, (5, 300))],
)
def test_graphs_on_and_off_give_identical_tokens(model_and_arch, batch, lengths):
    """Batch 64 of the demo model (2 KV heads: 128 CTAs) has a graph without split KV: prompts
    of even lengths replay it, a batch with a few long prompts the split one. Every batch's
    prompts fit one prefill step, so every later step replays a graph."""
    model, arch = model_and_arch
    generator = torch.Generator().manual_seed(batch + lengths[0])
    prompts = [
        torch.randint(0, 990, (int(n),), generator=generator).tolist()
        for n in torch.randint(*lengths, (batch,), generator=generator)
    ]
    if lengths == (5, 150):
        prompts[:3] = [prompt * 4 for prompt in prompts[:3]]  # three prompts far longer than the rest
    eager = make_runner(model, arch, num_pages=NUM_PAGES, page_size=PAGE_SIZE)
    graphed = make_runner(model, arch, num_pages=NUM_PAGES, page_size=PAGE_SIZE, graph_max_batch_size=64)
    assert eager.graphs is None and graphed.graphs is not None
    want, _ = generate(eager, prompts, 32, max_in_flight=1)
    got, replays = generate(graphed, prompts, 32)  # the next step launched before the last is read
    assert got == want
    assert generate(eager, prompts, 32)[0] == want
    if batch <= 64:
        assert replays == 31  # every decode step after the prefill step
    else:
        assert replays < 31  # steps of more than 64 requests run op by op
    unsplit = sum(n for (_, split), n in graphed.graphs.replays.items() if not split)
    if batch == 64:
        assert unsplit == (31 if lengths == (100, 120) else 0)
    else:
        assert unsplit == 0


@pytest.mark.parametrize("batch", [1, 16, 64])
def test_graphs_on_and_off_give_the_same_sampled_tokens(model_and_arch, batch):
    """Seeded requests sampled as most clients sample draw the same tokens whether the decode
    steps replay graphs or run op by op (the sampler runs after the graph, on its output)."""
    model, arch = model_and_arch
    generator = torch.Generator().manual_seed(batch)
    prompts = [
        torch.randint(0, 990, (int(n),), generator=generator).tolist()
        for n in torch.randint(5, 200, (batch,), generator=generator)
    ]
    sampling = {"temperature": 0.7, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.05}
    eager = make_runner(model, arch, num_pages=NUM_PAGES, page_size=PAGE_SIZE)
    graphed = make_runner(model, arch, num_pages=NUM_PAGES, page_size=PAGE_SIZE, graph_max_batch_size=64)
    want, _ = generate(eager, prompts, 32, max_in_flight=1, sampling=sampling)
    got, replays = generate(graphed, prompts, 32, sampling=sampling)
    assert got == want and replays == 31
    greedy, _ = generate(eager, prompts, 32, max_in_flight=1)
    assert sum(want[r] != greedy[r] for r in want) >= max(1, batch // 2)  # it did sample


def test_vision_graphs_match_eager(model_dir):
    from vlmd.kernels.vision_graph import VisionGraphs
    from vlmd.models.loader import load_vision

    vision = load_vision(model_dir, torch.bfloat16, torch.device("cuda"))
    graphs = VisionGraphs(vision, max_tiles=4, image_size=448)
    graphs.capture()
    generator = torch.Generator().manual_seed(0)
    for num_tiles in (1, 3, 4, 6):  # 6: beyond the captured sizes, op by op
        tiles = torch.randn(num_tiles, 3, 448, 448, generator=generator).to("cuda", torch.bfloat16)
        with torch.inference_mode():
            assert torch.equal(graphs(tiles).clone(), vision(tiles))


@pytest.mark.parametrize("graphs", [0, 64])
def test_launch_never_waits_for_work_already_queued(model_and_arch, graphs):
    """The host launches step N+1 while step N runs, so nothing in `launch` may wait for the
    device: not a sync, and not a copy out of pageable host memory (CUDA syncs the stream first).
    Each step is launched behind ~0.5 s of queued device time that must still be running after."""
    model, arch = model_and_arch
    runner = make_runner(model, arch, num_pages=NUM_PAGES, page_size=PAGE_SIZE, graph_max_batch_size=graphs)
    prompts = [[5 + i] * n for i, n in enumerate((7, 40, 130))]
    generate(runner, prompts, 4, max_in_flight=1)  # warm-up at these sizes: kernels, cached memory
    scheduler = Scheduler(SchedulerConfig(NUM_PAGES, PAGE_SIZE))
    for i, prompt in enumerate(prompts):
        scheduler.add(Request(f"q{i}", prompt, SamplingParams(max_new_tokens=4, ignore_eos=True)))
    replayed = []
    while scheduler.has_work():
        plan = scheduler.schedule()
        torch.cuda._sleep(1 << 30)  # about half a second of device time ahead of the step
        busy = torch.cuda.Event()
        busy.record()
        step = runner.launch(plan)
        graph_step = runner._graph_step(plan.items)
        assert not busy.query(), (
            f"launching a step ({'graph' if graph_step else 'eager'}) waited for the device"
        )
        scheduler.update(plan, runner.collect(step))
        replayed.append(graph_step)
    assert len(replayed) == 4 and not replayed[0]  # the prefill step, then three decode steps
    assert all(replayed[1:]) if graphs else not any(replayed)
