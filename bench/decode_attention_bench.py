"""Decode attention alone, as the CUDA graphs of `vlmd serve` run it: FlashInfer's graph-mode
split of every request's KV (the default) against one CTA per request and KV head, one run.

    python bench/decode_attention_bench.py [--batch_sizes 1 16 64] [--context 576] [--json PATH]
    python bench/decode_attention_bench.py --tiny   # the torch reference on the CPU: checks the script

The attention of InternVL3-8B's language model (28 layers, 28 query / 4 KV heads of 128, bf16,
16-token pages), every request `--context` tokens long (a 512-token prompt half way through 128
new tokens): each layer's KV append and decode kernel for one step, all 28 layers captured in one
CUDA graph and replayed. ms per step against the KV bytes read at the copy bandwidth measured in
the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_bench import copy_bandwidth, median_s  # noqa: E402

from vlmd.kernels.attention import BatchLayout, KVCacheSpec, TorchReferenceBackend  # noqa: E402
from vlmd.kernels.cuda_graph import GraphDecodeAttention  # noqa: E402
from vlmd.kernels.flashinfer_backend import FlashInferBackend  # noqa: E402

PAGE_SIZE = 16
FULL = {"layers": 28, "q_heads": 28, "kv_heads": 4, "head_dim": 128}
TINY = {"layers": 2, "q_heads": 4, "kv_heads": 2, "head_dim": 16}


def layout_for(batch: int, context: int) -> BatchLayout:
    """`batch` requests of `context` tokens, each on its own pages, one new token each."""
    pages = math.ceil(context / PAGE_SIZE)
    tables = [list(range(i * pages, (i + 1) * pages)) for i in range(batch)]
    return BatchLayout.from_page_tables(list(range(batch + 1)), [context] * batch, tables, PAGE_SIZE)


def step_seconds(
    attn, shape: dict, batch: int, device: torch.device, dtype: torch.dtype, repeats: int
) -> float:
    """One decode step's attention over every layer: replayed from a CUDA graph on a GPU."""
    gen = torch.Generator(device=device).manual_seed(batch)
    q = torch.randn(batch, shape["q_heads"], shape["head_dim"], generator=gen, device=device).to(dtype)
    kv = torch.randn(2, batch, shape["kv_heads"], shape["head_dim"], generator=gen, device=device).to(dtype)

    def step():
        for layer in range(shape["layers"]):
            attn.forward(layer, q, kv[0], kv[1])

    if device.type != "cuda":
        return median_s(step, device, repeats)
    step()  # warm-up: kernels loaded
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return median_s(graph.replay, device, repeats, warmup=3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--context", type=int, default=576, help="tokens in each request's cache")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", default=None)
    parser.add_argument("--tiny", action="store_true", help="the torch reference on the CPU, tiny heads")
    args = parser.parse_args(argv)
    device = torch.device("cpu") if args.tiny else torch.device("cuda", 0)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    shape = TINY if args.tiny else FULL
    bandwidth = copy_bandwidth(device, (64 if args.tiny else 2048) * 2**20, 3 if args.tiny else 10)
    pages = max(args.batch_sizes) * math.ceil(args.context / PAGE_SIZE)
    spec = KVCacheSpec(
        num_layers=shape["layers"],
        num_pages=pages + max(args.batch_sizes),  # + the graphs' dummy pages
        page_size=PAGE_SIZE,
        num_kv_heads=shape["kv_heads"],
        head_dim=shape["head_dim"],
        dtype=dtype,
        device=device,
    )
    scale = shape["head_dim"] ** -0.5
    if args.tiny:
        backend = TorchReferenceBackend(spec, shape["q_heads"], scale)
        policies = {"torch reference": lambda batch: backend}
    else:
        backend = FlashInferBackend(spec, shape["q_heads"], scale)
        policies = {
            "split KV (FlashInfer's graph mode)": lambda batch: GraphDecodeAttention(backend, batch),
            "one CTA per request and KV head": lambda batch: GraphDecodeAttention(
                backend, batch, split_kv=False
            ),
        }
    for cache in backend.kv_cache:
        cache.normal_()
    rows = []
    for batch in args.batch_sizes:
        layout = layout_for(batch, args.context)
        kv_bytes = batch * args.context * spec.bytes_per_token
        row = {"batch": batch, "roofline_ms": kv_bytes / bandwidth * 1e3, "ms": {}}
        for name, make in policies.items():
            attn = make(batch)
            attn.plan(layout)
            row["ms"][name] = step_seconds(attn, shape, batch, device, dtype, args.repeats) * 1e3
        rows.append(row)
    gpu = "CPU" if args.tiny else torch.cuda.get_device_name(device)
    print(f"# {gpu}; torch {torch.__version__}; {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(
        f"# command: python bench/decode_attention_bench.py {shlex.join(sys.argv[1:] if argv is None else argv)}"
    )
    print(
        f"# {shape['layers']} layers, {shape['q_heads']} query / {shape['kv_heads']} KV heads of "
        f"{shape['head_dim']}, {args.context} tokens per request; copy bandwidth {bandwidth / 1e12:.3f} TB/s"
    )
    names = list(policies)
    print("\n| batch | " + " | ".join(f"{n} ms" for n in names) + " | KV read at copy speed, ms |")
    print("|---|" + "---|" * len(names) + "---|")
    for r in rows:
        cells = " | ".join(f"{r['ms'][n]:.3f}" for n in names)
        print(f"| {r['batch']} | {cells} | {r['roofline_ms']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_bandwidth_bytes_per_s": bandwidth, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
