"""Where should the ViT run so that decoding does not stall? Decode steps while a ViT encodes back
to back, with the ViT placed each way vlmd could place it, all in one run on one GPU.

    python bench/vit_beside_bench.py [--batch_sizes 1 16] [--vit_batch 7] [--json PATH]
    python bench/vit_beside_bench.py --tiny   # the tiny model on the CPU: checks the script only

The InternVL3-8B-shaped model of `bench/gpu_bench.py` (random bf16 weights, CUDA graphs as
`vlmd serve` captures them). For each decode batch size, the median, p99 and longest decode step
and the ViT's tiles per second, with the ViT:

- alone: no ViT (decode steps on a high-priority stream, as the worker placement runs them);
- process: in another process on the same device (today's vision actor beside the LM worker: the
  two CUDA contexts time-share the GPU);
- thread_low: in a thread of the decoding process on a low-priority stream, decode on a
  high-priority one (the ViT in the worker's process);
- thread_equal: the same with both streams at the default priority;
- thread_green: the ViT in a thread on a CUDA green context of each `--vit_sms` count of SMs (op by op: graphs
  captured in the primary context do not replay in another), decode on the primary context; the
  ViT's blocks can then hold only those SMs. Skipped where torch has no green contexts;
- thread_sliced: the ViT in a thread, `--slice_tiles` tiles at a time, each slice queued on the
  decode steps' own stream once a step has been collected: every step waits for at most one
  slice (an encoder budget per step; the ViT's rate then follows the step rate).

The same question for the other half of an image's work, its prefill (about four times the ViT's
for InternVL3-8B), with the language model's forward over `--prefill_tokens` rows back to back
in a thread (random embeddings; attention dense and causal over the chunk, no KV cache: the
chunk's GEMMs and attention):

- prefill_low: on a low-priority stream, decode on a high-priority one;
- prefill_green: on a CUDA green context of each `--vit_sms` count of SMs, decode on the primary
  context (a prefill and a decode running at once on disjoint SMs, were it to pay).

The ViT alone (no decode) gives the tiles/s the others are compared with, the prefill alone its
tokens/s. Each ViT forward is `--vit_batch` tiles (7: one 1344x896 image) and waits for its rows,
as an encode does; each prefill forward waits for its last row too.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import shlex
import statistics
import sys
import threading
import time

import gpu_bench
import torch
import torch.nn.functional as F
from gpu_bench import Bench, add_text_requests, full_batch_decode, run_steps, sync

log = logging.getLogger("vit_beside_bench")

PLACEMENTS = (
    "alone",
    "process",
    "thread_low",
    "thread_equal",
    "thread_green",
    "thread_sliced",
    "prefill_low",
    "prefill_green",
)
GREEN = ("thread_green", "prefill_green")


class DenseCausal:
    """Causal attention over one chunk's own rows, with no KV cache (the prefill placements)."""

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.group, self.scale = num_q_heads // num_kv_heads, head_dim**-0.5

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, q_heads, head_dim], k and v [T, kv_heads, head_dim] -> [T, q_heads, head_dim]."""
        k, v = (t.repeat_interleave(self.group, dim=1).transpose(0, 1) for t in (k, v))
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, is_causal=True, scale=self.scale)
        return out.transpose(0, 1)


class Prefill:
    """The language model's forward over `embeds` [tokens, hidden] at positions 0..tokens-1."""

    def __init__(self, bench: Bench, tokens: int) -> None:
        arch = bench.arch
        self.lm = bench.lm
        self.attn = DenseCausal(arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim)
        self.embeds = (0.02 * torch.randn(tokens, arch.hidden_size, generator=bench.gen)).to(
            bench.device, bench.dtype
        )
        self.positions = torch.arange(tokens, device=bench.device)

    @torch.inference_mode()
    def __call__(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.lm.forward(embeds, self.positions, self.attn)


class ViTThread:
    """Forwards of `work` over `pixels` back to back on `stream`, in a thread, until stopped: the
    ViT over tiles, or a `Prefill` over its embeddings (rows counted as the ViT's tiles are)."""

    def __init__(
        self,
        vision,
        pixels: torch.Tensor,
        stream: torch.cuda.Stream | None,
        num_sms: int = 0,
        turn: threading.Semaphore | None = None,
    ) -> None:
        self.vision, self.pixels, self.stream = vision, pixels, stream
        self.num_sms = num_sms  # > 0: on a green context of that many SMs (stream ignored)
        self.turn = turn  # given: one forward per release (a decode step collected)
        self.stop = threading.Event()
        self.tiles_per_s = 0.0
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> ViTThread:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    @torch.inference_mode()
    def _loop(self) -> None:
        device = self.pixels.device
        if device.type == "cuda":
            torch.cuda.set_device(device)
            if self.num_sms:
                green = torch.cuda.GreenContext.create(num_sms=self.num_sms, device_id=device.index or 0)
                green.set_context()
                self.stream = green.Stream() if hasattr(green, "Stream") else torch.cuda.current_stream()
            torch.cuda.set_stream(self.stream)
        started, done = time.perf_counter(), 0
        while not done or not self.stop.is_set():  # at least one forward, however short the decode
            if self.turn is not None and not self.turn.acquire(timeout=0.05):
                continue
            self.vision(self.pixels)
            sync_stream(self.stream)  # an encode waits for its rows before it writes them out
            done += self.pixels.shape[0]
        self.tiles_per_s = done / (time.perf_counter() - started)


def sync_stream(stream: torch.cuda.Stream | None) -> None:
    if stream is not None:
        stream.synchronize()


def streams(
    device: torch.device, placement: str
) -> tuple[torch.cuda.Stream | None, torch.cuda.Stream | None]:
    """(decode stream, ViT stream) for a placement; None, None on the CPU."""
    if device.type != "cuda":
        return None, None
    low, high = torch.cuda.Stream.priority_range()  # (least, greatest): a lower number runs first
    if placement == "thread_equal":
        return torch.cuda.Stream(device, priority=low), torch.cuda.Stream(device, priority=low)
    return torch.cuda.Stream(device, priority=high), torch.cuda.Stream(device, priority=low)


def step_stats(steps, batch: int) -> dict:
    intervals = sorted(s.interval_s * 1e3 for s in full_batch_decode(steps, batch))
    p99 = intervals[min(len(intervals) - 1, round(0.99 * (len(intervals) - 1)))]
    return {"step_ms": statistics.median(intervals), "p99_step_ms": p99, "longest_step_ms": intervals[-1]}


def decode_with(
    bench: Bench,
    batch: int,
    placement: str,
    pixels: torch.Tensor,
    num_sms: int = 0,
    slice_tiles: int = 0,
    prefill: Prefill | None = None,
) -> dict:
    """Decode steps at `batch` with the ViT (or `prefill`) placed as `placement` (see the module
    docstring); the green placements on `num_sms` SMs, thread_sliced `slice_tiles` tiles a step."""
    if placement == "process":
        try:
            row = bench.decode_beside_vit(batch, ready_timeout_s=180)
        except RuntimeError as exc:  # seen once on an H100: the ViT process never got ready
            log.warning("ViT process placement not measured: %s", exc)
            return {"step_ms": None, "p99_step_ms": None, "longest_step_ms": None, "vit_tiles_per_s": None}
        return {k: row[k] for k in ("step_ms", "longest_step_ms", "vit_tiles_per_s")} | {
            "p99_step_ms": None  # gpu_bench reports the median and the longest only
        }
    if placement in GREEN and not green_contexts():
        log.warning("this torch has no CUDA green contexts: %s skipped", placement)
        return {"step_ms": None, "p99_step_ms": None, "longest_step_ms": None, "vit_tiles_per_s": None}
    decode_stream, vit_stream = streams(bench.device, placement)
    prompts = torch.randint(0, bench.shape.num_text_ids, (batch, bench.args.prompt_len), generator=bench.gen)
    add_text_requests(bench.scheduler, prompts, bench.args.new_tokens, f"{placement}{batch}")
    sync(bench.device)
    with torch.cuda.stream(decode_stream) if decode_stream is not None else contextlib.nullcontext():
        if placement == "alone":
            return step_stats(run_steps(bench.runner, bench.scheduler), batch) | {"vit_tiles_per_s": None}
        vision = getattr(bench.vision, "vision", bench.vision) if num_sms else bench.vision
        if placement.startswith("prefill"):
            vision, pixels = prefill, prefill.embeds
        turn = None
        if placement == "thread_sliced":
            pixels, vit_stream, turn = pixels[:slice_tiles], decode_stream, threading.Semaphore(0)
        with ViTThread(vision, pixels, vit_stream, num_sms, turn) as vit:
            on_step = (
                (lambda _: turn.release()) if turn is not None else None
            )  # thread_sliced: a slice a step
            steps = run_steps(bench.runner, bench.scheduler, on_step=on_step)
    sync(bench.device)
    return step_stats(steps, batch) | {"vit_tiles_per_s": vit.tiles_per_s}


def green_contexts() -> bool:
    module = getattr(torch.cuda, "green_contexts", None)
    return torch.cuda.is_available() and bool(getattr(module, "SUPPORTED", False))


def vit_alone(bench: Bench, pixels: torch.Tensor, seconds: float, work=None) -> float:
    """The ViT's tiles/s (or `work`'s rows/s) in its thread on a low-priority stream with nothing
    else running."""
    _, vit_stream = streams(bench.device, "thread_low")
    with ViTThread(work or bench.vision, pixels, vit_stream) as vit:
        time.sleep(seconds)
    return vit.tiles_per_s


def measure(args: argparse.Namespace) -> dict:
    bench = Bench(args)
    side = bench.arch.image_size
    pixels = torch.randn(args.vit_batch, 3, side, side, generator=bench.gen).to(bench.device, bench.dtype)
    warmup = torch.randint(
        0, bench.shape.num_text_ids, (max(args.batch_sizes), args.prompt_len), generator=bench.gen
    )
    add_text_requests(bench.scheduler, warmup, 3, "warmup")
    run_steps(bench.runner, bench.scheduler)
    seconds = 2.0 if bench.device.type == "cuda" else 0.1
    out = {"vit_alone_tiles_per_s": vit_alone(bench, pixels, seconds)}
    prefill = None
    if any(placement.startswith("prefill") for placement in args.placements):
        prefill = Prefill(bench, args.prefill_tokens)
        out["prefill_alone_tokens_per_s"] = vit_alone(bench, prefill.embeds, seconds, prefill)
    out["rows"] = []
    for batch in args.batch_sizes:
        for placement in args.placements:
            for name, num_sms, slice_tiles in variants(args, placement):
                log.info("decode at batch %d, %s", batch, name)
                row = decode_with(bench, batch, placement, pixels, num_sms, slice_tiles, prefill)
                out["rows"].append({"batch": batch, "placement": name} | row)
    bench.scheduler.check_integrity()
    return out


def variants(args: argparse.Namespace, placement: str) -> list[tuple[str, int, int]]:
    """(row name, SMs, tiles per slice) of each row a placement gives."""
    if placement in GREEN:
        return [(f"{placement} ({n} SMs)", n, 0) for n in args.vit_sms]
    if placement == "thread_sliced":
        return [(f"{placement} ({n} tiles a step)", 0, n) for n in args.slice_tiles]
    return [(placement, 0, 0)]


def report(meta: dict, out: dict) -> str:
    lines = [
        f"# ViT placement beside decoding, {meta['device']}, {meta['date']}",
        f"command: `{meta['command']}`; {meta['versions']}; GIL switch interval "
        f"{meta['switch_interval_ms']:g} ms",
        f"ViT alone: {out['vit_alone_tiles_per_s']:.0f} tiles/s ({meta['vit_batch']} tiles per forward)",
    ]
    if "prefill_alone_tokens_per_s" in out:
        lines.append(
            f"Prefill alone: {out['prefill_alone_tokens_per_s']:.0f} tokens/s "
            f"({meta['prefill_tokens']} tokens per forward, dense attention, no KV cache)"
        )
    lines += [
        "",
        "| batch | placement | step median ms | step p99 ms | longest ms | beside: ViT tiles/s or prefill tokens/s (x alone) |",
        "|---|---|---|---|---|---|",
    ]
    for row in out["rows"]:
        if row["step_ms"] is None:
            lines.append(f"| {row['batch']} | {row['placement']} | not run | | | |")
            continue
        vit = row["vit_tiles_per_s"]
        key = (
            "prefill_alone_tokens_per_s"
            if row["placement"].startswith("prefill")
            else "vit_alone_tiles_per_s"
        )
        vit_text = "-" if vit is None else f"{vit:.0f} ({vit / out[key]:.2f}x)"
        p99 = "-" if row["p99_step_ms"] is None else f"{row['p99_step_ms']:.2f}"
        lines.append(
            f"| {row['batch']} | {row['placement']} | {row['step_ms']:.2f} | {p99} | "
            f"{row['longest_step_ms']:.2f} | {vit_text} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="tiny float32 model on the CPU (checks the script)"
    )
    parser.add_argument("--batch_sizes", type=int, nargs="+")
    parser.add_argument(
        "--vit_batch", type=int, default=7, help="tiles per ViT forward (7: one 1344x896 image)"
    )
    parser.add_argument("--new_tokens", type=int, help="tokens per request: the decode run's length")
    parser.add_argument("--placements", nargs="+", choices=PLACEMENTS, default=list(PLACEMENTS))
    parser.add_argument(
        "--vit_sms",
        type=int,
        nargs="+",
        default=[33, 66, 99],
        help="SMs of the green context (thread_green, prefill_green)",
    )
    parser.add_argument(
        "--prefill_tokens", type=int, default=2048, help="rows per prefill forward (the prefill placements)"
    )
    parser.add_argument(
        "--slice_tiles", type=int, nargs="+", default=[1, 2, 4], help="tiles per step (thread_sliced)"
    )
    parser.add_argument(
        "--switch_interval_ms",
        type=float,
        help="Python's GIL switch interval (sys.setswitchinterval; default 5 ms): how long the decode "
        "thread may wait for the GIL while the ViT's thread launches kernels",
    )
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args(argv)
    # gpu_bench's settings, but batches 1 and 16 and enough decode steps beside the ViT for a p99.
    defaults = gpu_bench.TINY if args.tiny else gpu_bench.FULL | {"batch_sizes": [1, 16], "new_tokens": 256}
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.graph_max_batch_size = 64
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)7.0f ms %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    out = measure(args)
    device = torch.device(args.device)
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", *sys.argv]),
        "versions": f"torch {torch.__version__}",
        "vit_batch": args.vit_batch,
        "prefill_tokens": args.prefill_tokens,
        "switch_interval_ms": sys.getswitchinterval() * 1000,
    }
    print(report(meta, out))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, **out}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
