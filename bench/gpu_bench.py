"""GPU serving at the memory-bandwidth floor: vlmd against transformers and the copy roofline,
every figure from one run on one GPU.

    python bench/gpu_bench.py [--batch_sizes 1 16 64] [--new_tokens 128] [--prompt_len 512] [--json PATH]
    python bench/gpu_bench.py --tiny   # a tiny float32 model on the CPU: checks the script, not speed

An InternVL3-8B-shaped model (InternViT-300M + Qwen2-7B shape) gets random weights once, in
transformers' `InternVLForConditionalGeneration`; vlmd's language model and vision tower are
built from the same tensors (shared, not copied), so both sides run identical weights.

- copy bandwidth: a device-to-device copy of a >= 2 GiB tensor, (read + write bytes) / time;
- decode ms per step: vlmd driven by `Scheduler` + `ModelRunner` in process (the wall time
  between steps collected in a row, the next step launched before the last one's
  tokens are read back, as `vlmd serve` does; median over the decode steps at the full batch;
  also one step at a time, for comparison), against transformers' `generate`
  ((t(N new) - t(1 new)) / (N - 1));
- kernel profiles (CUDA): the GPU kernels of a greedy decode step at each batch, and of a step
  with every row sampled at the largest batch (what sampling adds);
- roofline: (LM weight bytes read per step + KV bytes read per step) / copy bandwidth, where
  the weights are every LM parameter except the input embedding table (the LM head is read);
- time to first token of one tile + text: vlmd = ViT + prefill with the image rows + first
  token; transformers = `generate(max_new_tokens=1)` with `pixel_values`;
- ViT tiles per second at one batch: vlmd's vision forward against `get_image_features`;
- decode beside the ViT: the decode steps at batch 16 while another process on the same device
  runs ViT forwards back to back (the vision actor beside the LM worker), and the ViT's tiles/s;
- with `--layouts`, then: an InternVL2.5-8B-shaped language model from OpenGVLab's checkpoint
  layout against the same weights in the HF-native layout (`bench/layout_bench.py`), at the
  smallest and largest batch.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.multiprocessing as mp

from vlmd.actors.worker import make_runner
from vlmd.core.page_allocator import pages_for
from vlmd.core.request import Request
from vlmd.core.scheduler import Scheduler, SchedulerConfig
from vlmd.image import TilingConfig
from vlmd.kernels.vision_attention import SDPA_TILE_ATTENTION, make_tile_attention
from vlmd.kernels.vision_graph import VisionGraphs
from vlmd.messages import EmbedRun, ImageRef, SamplingParams, StepPlan
from vlmd.models.config import InternVLArch
from vlmd.models.internvl import InternVLVision
from vlmd.models.loader import language_model_from_state_dict, vision_from_state_dict
from vlmd.runner import run_in_process

PAGE_SIZE = 16
# Defaults of the run's settings: the full run on the GPU, and --tiny on the CPU.
SETTINGS = ("batch_sizes", "prompt_len", "new_tokens", "ttft_text_tokens", "vit_batch", "repeats",
            "copy_mib", "profile_steps", "device", "dtype")  # fmt: skip
FULL = dict(zip(SETTINGS, ([1, 16, 64], 512, 128, 64, 12, 10, 2048, 8, "cuda", "bfloat16"), strict=True))
TINY = dict(zip(SETTINGS, ([1, 4], 32, 6, 16, 2, 3, 32, 0, "cpu", "float32"), strict=True))
# (name, measured key, goal, sense): the targets.
TARGETS = (
    ("batch-1 step / roofline", "b1_over_roofline", 1.15, "<="),
    ("batch-64 step / roofline", "b64_over_roofline", 1.35, "<="),
    ("ViT tiles/s, vlmd / transformers", "vit_speedup", 1.3, ">="),
    ("TTFT, vlmd / transformers", "ttft_ratio", 0.5, "<="),
    ("batch-64 step, every row sampled / greedy", "b64_sampled_over_greedy", 1.05, "<="),
)
# As most clients sample (issue 16): the sampled decode step's knobs.
SAMPLED = dict(temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.05)
# Qwen2-7B and InternViT-300M (InternVL3-8B), and the tiny model; then the token ids: prompts draw
# ordinary tokens below the first, then <img>, </img>, <IMG_CONTEXT>.
TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "vocab_size")  # fmt: skip
VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size")
SHAPES = {
    "full": ((3584, 18944, 28, 28, 4, 128, 151674), (1024, 4096, 24, 16, [448, 448]), (151643, 151665, 151666, 151667)),
    "tiny": ((128, 256, 2, 4, 2, 64, 512), (64, 128, 2, 4, [224, 224]), (500, 509, 510, 511)),
}  # fmt: skip
log = logging.getLogger("gpu_bench")


# --- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    config: dict[str, Any]  # config.json of an InternVL-hf model
    num_text_ids: int  # random prompts draw from [0, num_text_ids): ordinary tokens only
    img_start_id: int  # <img>
    img_end_id: int  # </img>


def model_shape(tiny: bool) -> ModelShape:
    """InternVL3-8B's shape (InternViT-300M + Qwen2-7B), or a tiny one for the CPU."""
    text_sizes, vision_sizes, (num_text_ids, img_start, img_end, img_context) = SHAPES[
        "tiny" if tiny else "full"
    ]
    text = dict(zip(TEXT_KEYS, text_sizes, strict=True)) | {
        "model_type": "qwen2",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
        "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
        "tie_word_embeddings": False,
    }
    vision = dict(zip(VISION_KEYS, vision_sizes, strict=True)) | {
        "model_type": "internvl_vision",
        "patch_size": [14, 14],
        "norm_type": "layer_norm",
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "attention_bias": True,
        "use_qk_norm": False,
        "use_mean_pooling": True,
    }
    side = vision["image_size"][0] // 14 // 2  # patches per side, pixel-shuffled by 0.5
    config = {
        "model_type": "internvl",
        "architectures": ["InternVLForConditionalGeneration"],
        "downsample_ratio": 0.5,
        "image_seq_length": side * side,
        "image_token_id": img_context,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
        "text_config": text,
        "vision_config": vision,
    }
    return ModelShape(config, num_text_ids, img_start, img_end)


def build_models(shape: ModelShape, dtype: torch.dtype, device: torch.device):
    """transformers' model with random weights, and vlmd's LM and vision tower sharing them."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    hf_config = InternVLConfig(**{k: v for k, v in shape.config.items() if k != "model_type"})
    with torch.device(device):
        hf = InternVLForConditionalGeneration._from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    hf = hf.to(device).eval().requires_grad_(False)
    randomize_(hf, seed=0)
    bad = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if not torch.isfinite(t).all()]
    assert not bad, f"non-finite weights or buffers: {bad}"
    hf.generation_config.eos_token_id = None  # every run generates exactly the tokens asked for
    hf.generation_config.pad_token_id = 0
    arch = InternVLArch.from_config_dict(shape.config)
    state = hf.state_dict()
    lm = language_model_from_state_dict(arch, state, dtype, device)
    vision = vision_from_state_dict(arch, state, dtype, device)
    return hf, lm, vision, arch


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter drawn here, whatever the constructor did: matrices, embeddings, CLS and
    positions N(0, 0.02); biases 0; norm gains and layer scales 1."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, 0.02, generator=gen)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)


def materialize_random(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int):
    """A model built (and sharded) on the meta device, given random weights on `device`:
    buffers that were built for real (rotary frequencies) keep their values and dtype."""
    buffers = {name: b.clone() for name, b in model.named_buffers() if not b.is_meta}
    model = model.to_empty(device=device).to(dtype)
    for name, value in buffers.items():
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, value.to(device))
    randomize_(model, seed=seed)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.fuse()
    return model.eval().requires_grad_(False)


def lm_weight_bytes(lm) -> int:
    """Bytes of LM weights a decode step reads: all but the input embedding table (which only
    gathers a few rows) unless it doubles as the LM head."""
    total = sum(p.numel() * p.element_size() for p in lm.parameters())  # tied weights appear once
    if not lm.arch.tie_word_embeddings:
        embed = lm.model.embed_tokens.weight
        total -= embed.numel() * embed.element_size()
    return total


# --- timing ------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_s(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of fn() with the device idle before and after each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, num_bytes: int, repeats: int) -> float:
    """Bytes per second of a device-to-device copy, counting the read and the write."""
    src = torch.ones(num_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    if device.type != "cuda":
        return 2 * num_bytes / median_s(lambda: dst.copy_(src), device, repeats)
    dst.copy_(src)
    pairs = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)
    ]
    for start, end in pairs:
        start.record()
        dst.copy_(src)
        end.record()
    torch.cuda.synchronize(device)
    return 2 * num_bytes / (statistics.median(s.elapsed_time(e) for s, e in pairs) / 1e3)


# --- the serving loop in process ---------------------------------------------------------------


@dataclass
class Step:
    plan: StepPlan
    interval_s: float  # wall time since the step before was collected: the step's share of the run


def run_steps(
    runner, scheduler: Scheduler, max_steps: int | None = None, overlap: bool = True, on_step=None
) -> list[Step]:
    """Drive scheduler and runner as the serving loop does (with overlap, the next step is
    launched before the last one's tokens are read back), timing each step's interval;
    `on_step(step)`, if given, after each step is collected (it may add requests)."""
    steps: list[Step] = []
    last = time.perf_counter()
    for plan, _ in run_in_process(scheduler, runner, 2 if overlap else 1, max_steps):
        now = time.perf_counter()
        steps.append(Step(plan, now - last))
        last = now
        if on_step is not None:
            on_step(steps[-1])
    return steps


def full_batch_decode(steps: list[Step], batch: int) -> list[Step]:
    """The steps in which all `batch` requests decode one token each (no prefill chunk rides
    along), less the first: it also waits for the prefill step before it."""
    decode = [
        s for s in steps if len(s.plan.items) == batch and all(len(i.token_ids) == 1 for i in s.plan.items)
    ][1:]
    assert decode, "no decode step ran at the full batch"
    return decode


@dataclass
class DecodeProfile:
    kernel_ms: float  # GPU time per decode step: kernels and copies, no host gaps
    top: list[tuple[str, float]]  # the costliest kernels, ms per step
    kernels_per_step: float = 0.0  # GPU activities (kernels, copies) per step
    gap_ms: float = 0.0  # per step, the GPU idle between one activity's end and the next's start
    long_gap_ms: float = 0.0  # the part of gap_ms in gaps over LONG_GAP_US (the device waiting
    # for the host), as opposed to the microsecond between back-to-back kernels of a graph
    # Where the long gaps fall: (activity before, activity after, ms per step, gaps per step),
    # the costliest pairs first.
    long_gaps: list[tuple[str, str, float, float]] = field(default_factory=list)

    def summary(self) -> str:
        where = "; ".join(
            f"{ms:.3f} ms in {count:g} gap(s) between {before[:40]} and {after[:40]}"
            for before, after, ms, count in self.long_gaps
        )
        return (
            f"{self.kernel_ms:.2f} ms of GPU kernels per step ({self.kernels_per_step:.0f} of them); "
            f"idle between them {self.gap_ms:.3f} ms, of which {self.long_gap_ms:.3f} ms in gaps over "
            f"{LONG_GAP_US} us" + (f" ({where})" if where else "")
        )


# A gap between GPU activities longer than this is the device waiting for the host; shorter ones
# are the launch latency between kernels queued back to back (inside a CUDA graph: ~1 us).
LONG_GAP_US = 20


def profile_decode(
    runner,
    scheduler: Scheduler,
    prompts: torch.Tensor,
    num_steps: int,
    tag: str,
    profiled: bool = True,
    sampling: dict | None = None,
) -> DecodeProfile | None:
    """Profile `num_steps` decode steps at the full batch of fresh requests for `prompts` (greedy,
    or sampled with `sampling`'s knobs), then finish them. With `profiled` off the same steps run
    unprofiled (the other ranks of a group)."""
    from torch.profiler import ProfilerActivity, profile

    # Prompts prefill in waves (the step token budget): early requests decode meanwhile, so
    # every request gets tokens to spare, and the profiled steps run at the full batch.
    add_text_requests(scheduler, prompts, num_steps + 32, tag, sampling)
    try:
        while scheduler.waiting or any(r.num_computed < len(r.prompt_ids) for r in scheduler.running):
            run_steps(runner, scheduler, max_steps=1)
        run_steps(runner, scheduler, max_steps=1)  # the first decode waits for the prefill
        if not profiled:
            run_steps(runner, scheduler, max_steps=num_steps)
            return None
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            steps = run_steps(runner, scheduler, max_steps=num_steps)
        assert all(len(s.plan.items) == prompts.shape[0] for s in steps), "a profiled step was not full"
        per_name: dict[str, float] = {}
        spans = []
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                per_name[e.name] = per_name.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e3 / len(steps)
                spans.append((e.time_range.start, e.time_range.end, e.name))
        if not per_name:
            raise RuntimeError("the profiler saw no GPU activity (is CUPTI missing?)")
        top = sorted(per_name.items(), key=lambda kv: -kv[1])[:15]
        return gap_profile(spans, len(steps), sum(per_name.values()), [(name[:90], ms) for name, ms in top])
    finally:
        run_steps(runner, scheduler)  # finish the requests


def gap_profile(
    spans: list[tuple[float, float, str]],
    num_steps: int,
    kernel_ms: float = 0.0,
    top: list[tuple[str, float]] | None = None,
) -> DecodeProfile:
    """The profile of `num_steps` steps from their GPU activities (start us, end us, name): the
    idle time between activities per step, and which activities the long gaps fall between;
    `kernel_ms` and `top` are passed through."""
    spans = sorted(spans)
    gaps = [(max(0.0, b[0] - a[1]), a[2], b[2]) for a, b in zip(spans, spans[1:], strict=False)]
    long_gaps: dict[tuple[str, str], list[float]] = {}
    for gap, before, after in gaps:
        if gap > LONG_GAP_US:
            long_gaps.setdefault((before, after), []).append(gap)
    where = sorted(long_gaps.items(), key=lambda kv: -sum(kv[1]))[:4]
    return DecodeProfile(
        kernel_ms,
        top or [],
        kernels_per_step=len(spans) / num_steps,
        gap_ms=sum(g for g, _, _ in gaps) / 1e3 / num_steps,
        long_gap_ms=sum(g for g, _, _ in gaps if g > LONG_GAP_US) / 1e3 / num_steps,
        long_gaps=[(b, a, sum(g) / 1e3 / num_steps, len(g) / num_steps) for (b, a), g in where],
    )


def add_text_requests(
    scheduler: Scheduler, prompts: torch.Tensor, new_tokens: int, tag: str, sampling: dict | None = None
) -> None:
    """Greedy requests, or sampled with `sampling`'s knobs."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, **(sampling or {}))
    for i, ids in enumerate(prompts.tolist()):
        scheduler.add(Request(f"{tag}-{i}", ids, params))


def hf_generate(hf, input_ids: torch.Tensor, new_tokens: int, pixel_values=None) -> None:
    images = {} if pixel_values is None else {"pixel_values": pixel_values}
    out = hf.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        **images,
    )
    assert out.shape[1] == input_ids.shape[1] + new_tokens, "generate stopped early"


# --- the measurements --------------------------------------------------------------------------


class Bench:
    """transformers' model and vlmd's (same weights, same device), and vlmd's serving loop."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.kernel_breakdown: dict[
            str, list[tuple[str, float]]
        ] = {}  # "batch[, sampled]" -> top kernels, ms/step
        self.gaps: dict[str, str] = {}  # the same keys -> the profile's summary line (kernels, idle gaps)
        self.profiles: dict[str, dict | None] = {}  # one profiled call of the TTFT and ViT paths
        self.device, self.dtype = torch.device(args.device), getattr(torch, args.dtype)
        self.shape = model_shape(args.tiny)
        self.hf, self.lm, self.vision, self.arch = build_models(self.shape, self.dtype, self.device)
        self.gen = torch.Generator().manual_seed(1)
        max_batch = max(args.batch_sizes)
        ttft_tokens = args.ttft_text_tokens + self.arch.image_seq_length + 2 + 1
        num_pages = max(
            max_batch * pages_for(args.prompt_len + args.new_tokens, PAGE_SIZE),
            pages_for(ttft_tokens, PAGE_SIZE),
        )
        # The embed store holds one tile's rows; the TTFT run writes the ViT's output into it.
        store = torch.empty(
            self.arch.image_seq_length, self.arch.hidden_size, dtype=self.dtype, device=self.device
        )
        graph_max_batch_size = args.graph_max_batch_size if self.device.type == "cuda" else 0
        self.runner = make_runner(
            self.lm,
            self.arch,
            num_pages=num_pages,
            page_size=PAGE_SIZE,
            embed_store=store,
            graph_max_batch_size=graph_max_batch_size,  # decode steps replayed as `vlmd serve` does
        )
        # The vision actor's default attention (FlashInfer where it serves, else SDPA).
        self.vision.set_tile_attention(
            make_tile_attention("auto", self.device, self.dtype, self.arch.vision_head_dim, log)
        )
        if graph_max_batch_size:  # as the vision actor does: one image's tiles replay a graph
            max_tiles = TilingConfig().max_tiles_per_image
            self.vision = VisionGraphs(self.vision, max(max_tiles, args.vit_batch), self.arch.image_size)
            self.vision.capture()
        # The server's default step budget: a large batch prefills over a few steps, in waves.
        # Runs repeat their prompts (overlap on and off, TTFT repeats): the prefix cache would make
        # the repeats short prefills and keep pages the next run sizes its pool without.
        config = SchedulerConfig(
            num_pages, PAGE_SIZE, max_running_requests=max(256, max_batch), enable_prefix_cache=False
        )
        self.scheduler = Scheduler(config)

    def decode_row(self, batch: int, bandwidth: float) -> dict:
        """vlmd's and transformers' decode step at one batch size, against the roofline."""
        args, arch = self.args, self.arch
        prompts = torch.randint(0, self.shape.num_text_ids, (batch, args.prompt_len), generator=self.gen)
        row = {"batch": batch} | self.vlmd_decode(prompts)
        row["vlmd_kernel_ms"] = self.vlmd_kernel_ms(prompts)
        if batch == max(args.batch_sizes):  # where sampling costs the most: what it spends
            row["vlmd_sampled_kernel_ms"] = self.vlmd_kernel_ms(prompts, SAMPLED)
        row["transformers_step_ms"] = self.hf_decode_ms(prompts.to(self.device))
        avg_context = args.prompt_len + args.new_tokens / 2  # decode steps read prompt+1 .. prompt+new-1
        elem = torch.empty((), dtype=self.dtype).element_size()
        kv_bytes = (
            batch * avg_context * 2 * arch.num_hidden_layers * arch.num_key_value_heads * arch.head_dim * elem
        )
        row["kv_bytes_per_step"] = kv_bytes
        row["roofline_ms"] = (lm_weight_bytes(self.lm) + kv_bytes) / bandwidth * 1e3
        row["vlmd_over_roofline"] = row["vlmd_step_ms"] / row["roofline_ms"]
        row["sampled_over_greedy"] = row["vlmd_sampled_step_ms"] / row["vlmd_step_ms"]
        row["transformers_over_roofline"] = row["transformers_step_ms"] / row["roofline_ms"]
        return row

    def vlmd_decode(self, prompts: torch.Tensor) -> dict:
        """Median ms of the steps in which every request of the batch decodes one token (no
        prefill chunk rides along), with the next step launched before the last one is read
        back (as served) and, for comparison, one step at a time; then as served with every row
        sampled (SAMPLED)."""
        batch = prompts.shape[0]
        out = {}
        runs = (
            (True, "vlmd_step_ms", None),
            (False, "vlmd_serial_step_ms", None),
            (True, "vlmd_sampled_step_ms", SAMPLED),
        )
        for overlap, key, sampling in runs:
            add_text_requests(self.scheduler, prompts, self.args.new_tokens, f"decode{batch}{key}", sampling)
            decode = full_batch_decode(run_steps(self.runner, self.scheduler, overlap=overlap), batch)
            out[key] = statistics.median(s.interval_s for s in decode) * 1e3
            out["num_decode_steps"] = len(decode)
        return out

    def decode_beside_vit(self, batch: int, ready_timeout_s: float = 900) -> dict:
        """Decode steps at `batch` while another process on the same device runs ViT forwards of
        --vit_batch tiles back to back, as the vision actor does beside the LM worker: the
        median and the longest step, and the tiles per second the ViT kept up meanwhile."""
        ctx = mp.get_context("spawn")
        ready, go, stop, rates = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Queue()
        config = (self.shape.config, self.args.dtype, str(self.device), self.args.vit_batch)
        vit = ctx.Process(target=vit_beside, args=(*config, ready, go, stop, rates), daemon=True)
        vit.start()
        try:
            if not ready.wait(timeout=ready_timeout_s):
                raise RuntimeError("the ViT process did not get ready")
            prompts = torch.randint(
                0, self.shape.num_text_ids, (batch, self.args.prompt_len), generator=self.gen
            )
            add_text_requests(self.scheduler, prompts, self.args.new_tokens, f"beside_vit{batch}")
            go.set()
            steps = run_steps(self.runner, self.scheduler)
            stop.set()
            tiles_per_s = rates.get(timeout=300)
        finally:  # however the decode ended, the other process stops
            go.set()
            stop.set()
            vit.join(timeout=60)
            if vit.is_alive():
                vit.kill()
        intervals = [s.interval_s * 1e3 for s in full_batch_decode(steps, batch)]
        return {
            "batch": batch,
            "step_ms": statistics.median(intervals),
            "longest_step_ms": max(intervals),
            "vit_tiles_per_s": tiles_per_s,
        }

    def vlmd_kernel_ms(self, prompts: torch.Tensor, sampling: dict | None = None) -> float | None:
        """GPU time per decode step summed over the profiler's kernels and copies: the step
        with no host overhead (greedy, or sampled with `sampling`'s knobs). None on the CPU,
        when off, or if the profiler fails."""
        if self.device.type != "cuda" or self.args.profile_steps < 1:
            return None
        what = f"{prompts.shape[0]}" + (", every row sampled" if sampling else "")
        try:
            prof = profile_decode(
                self.runner,
                self.scheduler,
                prompts,
                self.args.profile_steps,
                f"profile{what}",
                sampling=sampling,
            )
        except Exception as exc:  # an optional figure: never lose the run over it
            log.warning("kernel time not measured: %s: %s", type(exc).__name__, exc)
            return None
        self.kernel_breakdown[what] = prof.top
        self.gaps[what] = prof.summary()
        return prof.kernel_ms

    def hf_decode_ms(self, prompts: torch.Tensor) -> float:
        """(t(new_tokens) - t(1)) / (new_tokens - 1): the prefill and first sample cancel out. Each
        a median of 3 or more runs: with one run of each, a shared CPU machine once gave the tiny
        run a negative step."""
        new_tokens, repeats = self.args.new_tokens, max(3, self.args.repeats // 3)
        one = median_s(lambda: hf_generate(self.hf, prompts, 1), self.device, repeats, warmup=1)
        full = median_s(lambda: hf_generate(self.hf, prompts, new_tokens), self.device, repeats, warmup=0)
        return (full - one) / (new_tokens - 1) * 1e3

    def ttft(self) -> dict:
        """One 448 px tile + text: vlmd's ViT + prefill + first token, against generate(1 token)."""
        side, repeats = self.arch.image_size, self.args.repeats
        tile = torch.randn(1, 3, side, side, generator=self.gen).to(self.device, self.dtype)
        text = torch.randint(
            0, self.shape.num_text_ids, (self.args.ttft_text_tokens,), generator=self.gen
        ).tolist()
        half = len(text) // 2
        image = [self.arch.image_token_id] * self.arch.image_seq_length
        prompt = text[:half] + [self.shape.img_start_id, *image, self.shape.img_end_id] + text[half:]
        vlmd = [self.vlmd_ttft_s(prompt, half + 1, tile, f"ttft{i}") for i in range(repeats + 2)][2:]
        self.profiles["ttft"] = kernel_profile(
            lambda: self.vlmd_ttft_s(prompt, half + 1, tile, "ttftp"), self.device
        )
        with torch.inference_mode():
            self.profiles["ttft_vit_only"] = kernel_profile(lambda: self.vision(tile), self.device)
        ids = torch.tensor([prompt], device=self.device)
        hf = median_s(lambda: hf_generate(self.hf, ids, 1, pixel_values=tile), self.device, repeats, warmup=2)
        return {"vlmd": statistics.median(vlmd) * 1e3, "transformers": hf * 1e3}

    def vlmd_ttft_s(self, prompt: list[int], offset: int, tile: torch.Tensor, tag: str) -> float:
        store = self.runner.embed_store
        sync(self.device)
        started = time.perf_counter()
        with torch.inference_mode():
            store.copy_(self.vision(tile))  # [image_seq_length, hidden]
        params = SamplingParams(max_new_tokens=1, ignore_eos=True)
        image = ImageRef("bench", "", 0, num_tiles=1, token_offset=offset, num_tokens=store.shape[0])
        self.scheduler.add(Request(tag, prompt, params, images=[image]))
        self.scheduler.images_ready(tag, [EmbedRun("bench", 0, store.shape[0])])
        run_steps(self.runner, self.scheduler)
        return time.perf_counter() - started

    @torch.inference_mode()
    def vit(self) -> dict:
        """Tiles per second at one batch, and how far apart the two towers' rows are."""
        side, batch, repeats = self.arch.image_size, self.args.vit_batch, self.args.repeats
        tiles = torch.randn(batch, 3, side, side, generator=self.gen).to(self.device, self.dtype)
        hf_features = self.hf.model.get_image_features
        vlmd = median_s(lambda: self.vision(tiles), self.device, repeats, warmup=2)
        self.profiles["vit"] = kernel_profile(lambda: self.vision(tiles), self.device)
        hf = median_s(lambda: hf_features(pixel_values=tiles), self.device, repeats, warmup=2)
        got = self.vision(tiles).float()
        want = hf_features(pixel_values=tiles)
        want = getattr(want, "pooler_output", want).reshape(got.shape).float()
        out = {
            "tiles_per_s": {"vlmd": batch / vlmd, "transformers": batch / hf},
            "vision_rel_err": ((got - want).norm() / want.norm()).item(),
        }
        if self.device.type == "cuda":  # the same ViT with SDPA's attention, beside it
            sdpa = self.vit_with_sdpa_attention(tiles)
            if sdpa is not None:
                out["tiles_per_s"]["vlmd_sdpa_attention"] = batch / sdpa["seconds"]
                out["vision_rel_err_sdpa_attention"] = ((sdpa["rows"] - want).norm() / want.norm()).item()
        return out

    def vit_with_sdpa_attention(self, tiles: torch.Tensor) -> dict | None:
        """Seconds per ViT forward (graphs captured as for the default) and its rows, with
        `--vit_attention sdpa`; None where SDPA is already the default."""
        model = getattr(self.vision, "vision", self.vision)  # under VisionGraphs
        default = model.tile_attention
        if default is SDPA_TILE_ATTENTION:
            return None
        model.set_tile_attention(SDPA_TILE_ATTENTION)
        try:
            vision = model
            if isinstance(self.vision, VisionGraphs):
                vision = VisionGraphs(model, tiles.shape[0], self.arch.image_size)
                vision.capture()
            seconds = median_s(lambda: vision(tiles), self.device, self.args.repeats, warmup=2)
            self.profiles["vit_sdpa_attention"] = kernel_profile(lambda: vision(tiles), self.device)
            return {"seconds": seconds, "rows": vision(tiles).float().clone()}
        finally:
            model.set_tile_attention(default)


def vit_beside(config: dict, dtype: str, device: str, tiles: int, ready, go, stop, rates) -> None:
    """The other process of `Bench.decode_beside_vit`: its own ViT (random weights, fused as the
    vision actor loads it) on the same device, forwards of `tiles` tiles back to back from `go`
    to `stop`; puts the tiles per second it ran."""
    arch, device, dtype = InternVLArch.from_config_dict(config), torch.device(device), getattr(torch, dtype)
    with torch.device("meta"):
        vision = InternVLVision(arch)
    vision = materialize_random(vision, device, dtype, seed=2)
    # The vision actor's default attention, as the main process's ViT has it.
    vision.set_tile_attention(make_tile_attention("auto", device, dtype, arch.vision_head_dim, log))
    side = arch.image_size
    pixels = torch.randn(tiles, 3, side, side, device=device, dtype=dtype)
    with torch.inference_mode():
        vision(pixels)  # kernels compiled and loaded before the decode starts
        sync(device)
        ready.set()
        go.wait()
        started, done = time.perf_counter(), 0
        while not done or not stop.is_set():  # at least one forward, however short the decode
            vision(pixels)
            sync(device)
            done += tiles
        rates.put(done / (time.perf_counter() - started))


def kernel_profile(fn, device: torch.device, top: int = 10) -> dict | None:
    """One call of `fn` under the profiler: its wall time, its GPU kernel time and top kernels."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    wall_ms = (time.perf_counter() - started) * 1e3
    per_name: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_name[e.name] = per_name.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e3
    rows = sorted(per_name.items(), key=lambda kv: -kv[1])[:top]
    return {"wall_ms": wall_ms, "gpu_ms": sum(per_name.values()), "top": [(n[:90], ms) for n, ms in rows]}


def measure(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    bench = Bench(args)
    log.info("models built in %.1f s", time.perf_counter() - started)
    out: dict[str, Any] = {"cuda_graphs": bench.runner.graphs is not None}
    out["copy_bandwidth_bytes_per_s"] = copy_bandwidth(bench.device, args.copy_mib * 2**20, args.repeats)
    out["lm_weight_bytes"] = lm_weight_bytes(bench.lm)
    log.info("vlmd warm-up (FlashInfer compiles its kernels on a first run)")
    warmup = torch.randint(
        0, bench.shape.num_text_ids, (max(args.batch_sizes), args.prompt_len), generator=bench.gen
    )
    add_text_requests(bench.scheduler, warmup, 3, "warmup")
    run_steps(bench.runner, bench.scheduler)
    out["decode"] = []
    for batch in args.batch_sizes:
        log.info("decode at batch %d", batch)
        out["decode"].append(bench.decode_row(batch, out["copy_bandwidth_bytes_per_s"]))
    beside = 16 if 16 in args.batch_sizes else min(args.batch_sizes)
    log.info("decode at batch %d beside a ViT process on the same device", beside)
    alone = next(row for row in out["decode"] if row["batch"] == beside)
    out["beside_vit"] = bench.decode_beside_vit(beside) | {"alone_step_ms": alone["vlmd_step_ms"]}
    log.info("time to first token")
    out["ttft_ms"] = bench.ttft()
    log.info("ViT at batch %d", args.vit_batch)
    vit = bench.vit()
    out["vit_tiles_per_s"], out["vision_rel_err"] = vit["tiles_per_s"], vit["vision_rel_err"]
    if "vision_rel_err_sdpa_attention" in vit:
        out["vision_rel_err_sdpa_attention"] = vit["vision_rel_err_sdpa_attention"]
    out["kernel_breakdown"] = {str(b): rows for b, rows in bench.kernel_breakdown.items()}
    out["gaps"] = {str(b): line for b, line in bench.gaps.items()}
    out["profiles"] = bench.profiles
    bench.scheduler.check_integrity()
    return out


# --- the report --------------------------------------------------------------------------------


def target_rows(out: dict) -> list[dict]:
    by_batch = {row["batch"]: row for row in out["decode"]}
    measured = {
        "b1_over_roofline": by_batch.get(1, {}).get("vlmd_over_roofline"),
        "b64_over_roofline": by_batch.get(64, {}).get("vlmd_over_roofline"),
        "vit_speedup": out["vit_tiles_per_s"]["vlmd"] / out["vit_tiles_per_s"]["transformers"],
        "ttft_ratio": out["ttft_ms"]["vlmd"] / out["ttft_ms"]["transformers"],
        "b64_sampled_over_greedy": by_batch.get(64, {}).get("sampled_over_greedy"),
    }
    rows = []
    for name, key, goal, sense in TARGETS:
        value = measured[key]
        passed = None if value is None else (value <= goal if sense == "<=" else value >= goal)
        rows.append({"name": name, "value": value, "goal": f"{sense} {goal}x", "pass": passed})
    return rows


def _f(value: float | None, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.2f}{suffix}"


def report(meta: dict, out: dict) -> str:
    lines = [
        f"# {meta['gpu']}; torch {meta['torch']}; flashinfer {meta['flashinfer']}; "
        f"transformers {meta['transformers']}; {meta['date']}",
        f"# command: {meta['command']}",
        f"# {meta['model']}; {meta['dtype']}; LM weights read per step {out['lm_weight_bytes'] / 1e9:.2f} GB; "
        f"copy bandwidth {out['copy_bandwidth_bytes_per_s'] / 1e12:.3f} TB/s; "
        f"vlmd CUDA graphs: {'yes' if out['cuda_graphs'] else 'no'}",
        f"# decode: {meta['prompt_len']}-token prompts, {meta['new_tokens']} new tokens; "
        "roofline = (LM weight bytes + KV bytes read) / copy bandwidth; sampled: every row "
        + ", ".join(f"{k} {v}" for k, v in SAMPLED.items()),
        "",
        "| batch | vlmd ms/step | vlmd ms/step, no overlap | vlmd ms/step, sampled | vlmd kernel ms "
        "| GPU idle share | transformers ms/step | roofline ms | vlmd / roofline | transformers / roofline "
        "| vlmd tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["decode"]:
        kernel = r["vlmd_kernel_ms"]
        idle = None if kernel is None else max(0.0, 1 - kernel / r["vlmd_step_ms"]) * 100
        lines.append(
            f"| {r['batch']} | {_f(r['vlmd_step_ms'])} | {_f(r['vlmd_serial_step_ms'])} "
            f"| {_f(r['vlmd_sampled_step_ms'])} | {_f(kernel)} "
            f"| {_f(idle, '%')} "
            f"| {_f(r['transformers_step_ms'])} | {_f(r['roofline_ms'])} | {_f(r['vlmd_over_roofline'], 'x')} "
            f"| {_f(r['transformers_over_roofline'], 'x')} | {r['batch'] / r['vlmd_step_ms'] * 1e3:.0f} |"
        )
    ttft, vit = out["ttft_ms"], out["vit_tiles_per_s"]
    lines += [
        "",
        "| metric | vlmd | transformers | vlmd / transformers |",
        "|---|---|---|---|",
        f"| TTFT ms, 1 tile + {meta['ttft_text_tokens']} text tokens | {ttft['vlmd']:.2f} "
        f"| {ttft['transformers']:.2f} | {ttft['vlmd'] / ttft['transformers']:.2f}x |",
        f"| ViT tiles/s at batch {meta['vit_batch']} | {vit['vlmd']:.0f} | {vit['transformers']:.0f} "
        f"| {vit['vlmd'] / vit['transformers']:.2f}x |",
    ]
    if "vlmd_sdpa_attention" in vit:
        lines.append(
            f"| ViT tiles/s at batch {meta['vit_batch']}, `--vit_attention sdpa` "
            f"| {vit['vlmd_sdpa_attention']:.0f} | {vit['transformers']:.0f} "
            f"| {vit['vlmd_sdpa_attention'] / vit['transformers']:.2f}x |"
        )
    beside = out["beside_vit"]
    lines += [
        "",
        f"Decode at batch {beside['batch']} beside a ViT process on the same device (forwards of "
        f"{meta['vit_batch']} tiles back to back, as the vision actor beside the LM worker): "
        f"{beside['step_ms']:.2f} ms per step (alone {beside['alone_step_ms']:.2f}: "
        f"{beside['step_ms'] / beside['alone_step_ms']:.2f}x), longest step {beside['longest_step_ms']:.2f} ms; "
        f"the ViT meanwhile {beside['vit_tiles_per_s']:.0f} tiles/s (alone {vit['vlmd']:.0f})",
    ]
    lines += [
        "",
        "| target | measured | goal | result |",
        "|---|---|---|---|",
    ]
    for t in out["targets"]:
        result = {True: "pass", False: "miss", None: "n/a (not run)"}[t["pass"]]
        lines.append(f"| {t['name']} | {_f(t['value'], 'x')} | {t['goal']} | {result} |")
    lines += [
        "",
        f"# vision rows, vlmd vs transformers: relative error {out['vision_rel_err']:.1e}"
        + (
            f" (with SDPA attention {out['vision_rel_err_sdpa_attention']:.1e})"
            if "vision_rel_err_sdpa_attention" in out
            else ""
        )
        + f"; total wall time {out['wall_s']:.0f} s",
    ]
    for batch, rows in out.get("kernel_breakdown", {}).items():
        if batch in out.get("gaps", {}):
            lines += ["", f"Batch {batch}: {out['gaps'][batch]}"]
        lines += ["", f"Top GPU kernels per decode step at batch {batch} (ms):", ""]
        lines += [f"- {ms:.3f} {name}" for name, ms in rows]
    for what, prof in out.get("profiles", {}).items():
        if prof:
            lines += [
                "",
                f"Profile of one {what} call: wall {prof['wall_ms']:.2f} ms, GPU kernels {prof['gpu_ms']:.2f} ms",
                "",
            ]
            lines += [f"- {ms:.3f} {name}" for name, ms in prof["top"]]
    return "\n".join(lines)


def versions(device: torch.device) -> dict:
    import transformers

    try:
        import flashinfer

        flashinfer_version = flashinfer.__version__
    except Exception as exc:  # absent, or present but broken: say which
        flashinfer_version = f"not importable ({type(exc).__name__})"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "flashinfer": flashinfer_version,
        "transformers": transformers.__version__,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import layout_bench  # it imports this module: not at the top

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny float32 model on the CPU, few steps")
    parser.add_argument("--batch_sizes", type=int, nargs="+")
    parser.add_argument("--prompt_len", type=int)
    parser.add_argument("--new_tokens", type=int, help="tokens generated per request (>= 2)")
    parser.add_argument(
        "--ttft_text_tokens", type=int, help="text tokens around the image in the TTFT prompt"
    )
    parser.add_argument("--vit_batch", type=int, help="tiles per ViT forward")
    parser.add_argument("--repeats", type=int, help="timed runs per median")
    parser.add_argument("--copy_mib", type=int, help="size of the copied tensor")
    parser.add_argument("--profile_steps", type=int, help="decode steps profiled for kernel time (0: off)")
    parser.add_argument(
        "--graph_max_batch_size", type=int, default=64, help="vlmd's CUDA graphs, as `vlmd serve` (0: off)"
    )
    parser.add_argument("--device")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument(
        "--layouts", action="store_true", help="also time OpenGVLab's checkpoint layout against HF-native's"
    )
    layout_bench.add_arguments(parser)
    args = parser.parse_args(argv)
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.new_tokens < 2:
        parser.error("--new_tokens must be at least 2 (one prefill token, one decode step)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)7.0f ms %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    started = time.perf_counter()
    out = measure(args)
    import layout_bench  # it imports this module: not at the top

    if args.layouts:
        gc.collect()  # the InternVL3-8B models go before the two InternVL2.5-8B-shaped ones come
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        layouts = argparse.Namespace(**vars(args))
        layouts.batch_sizes = sorted({min(args.batch_sizes), max(args.batch_sizes)})
        out["layouts"] = layout_bench.measure(layouts, out["copy_bandwidth_bytes_per_s"])
    out["targets"] = target_rows(out)
    out["wall_s"] = time.perf_counter() - started
    meta = (
        versions(torch.device(args.device))
        | {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": shlex.join(["python", *sys.argv]),
            "model": "tiny InternVL"
            if args.tiny
            else "InternVL3-8B-shaped (InternViT-300M + Qwen2-7B), random weights",
            "dtype": args.dtype,
        }
        | {
            k: getattr(args, k)
            for k in ("prompt_len", "new_tokens", "ttft_text_tokens", "vit_batch", "batch_sizes")
        }
    )
    print(report(meta, out))
    if "layouts" in out:
        print("\n" + layout_bench.report(out["layouts"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, **out}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
