"""Decode-step linear layers at a few rows: cuBLAS (F.linear) against vlmd's Triton GEMV, on the
weight shapes of gpu_bench's InternVL3-8B-shaped language model at --tp 1 and --tp 2, side by side in
one run.

    python bench/gemv_bench.py [--tp 1 2] [--sweep] [--json PATH]

Every shape is timed as the model runs it: one CUDA graph multiplies by `layers` distinct
weight matrices back to back (more bytes than L2 holds, so every weight comes from HBM), and
the graph is replayed; microseconds per matrix, against the time its bytes take at the copy
bandwidth measured in the same run. `--sweep` also times other (BLOCK_N, BLOCK_K, warps)
choices of the Triton kernel.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_bench import copy_bandwidth, model_shape  # noqa: E402

from vlmd.kernels.gemv import _gemv_kernel, make_gemv  # noqa: E402
from vlmd.models.config import InternVLArch  # noqa: E402
from vlmd.models.decoder import LM_HEAD_ROW_MULTIPLE  # noqa: E402


def shapes(arch: InternVLArch, tp: int) -> list[tuple[str, int, int, bool, int]]:
    """(name, N, K, bias, matrices per step) of one rank's decode linears at tensor-parallel `tp`
    (the LM head padded as on CUDA, then split by vocabulary)."""
    hidden, head_dim, layers = arch.hidden_size, arch.head_dim, arch.num_hidden_layers
    heads, kv_heads = arch.num_attention_heads // tp, max(1, arch.num_key_value_heads // tp)
    vocab = -(-arch.vocab_size // LM_HEAD_ROW_MULTIPLE) * LM_HEAD_ROW_MULTIPLE
    return [
        (f"tp{tp} qkv", (heads + 2 * kv_heads) * head_dim, hidden, True, layers),
        (f"tp{tp} o_proj", hidden, heads * head_dim, False, layers),
        (f"tp{tp} gate_up", 2 * arch.intermediate_size // tp, hidden, False, layers),
        (f"tp{tp} down", hidden, arch.intermediate_size // tp, False, layers),
        (f"tp{tp} lm_head", vocab // tp, hidden, False, 1),
    ]


def time_graph(fn, replays: int = 20) -> float:
    """ms per replay of a CUDA graph of `fn`."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()  # compile / warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def triton_call(x, w, b, y, block_n, block_k, warps, pdl):
    n, k = w.shape
    _gemv_kernel[(-(-n // block_n),)](
        x, w, b if b is not None else w, y, n, k, w.stride(0), HAS_BIAS=b is not None, BLOCK_N=block_n,
        BLOCK_K=block_k, PDL=pdl, num_warps=warps, launch_pdl=pdl,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda", 0)
    bandwidth = copy_bandwidth(device, 2 * 2**30, 10)
    gemv = make_gemv(device)
    assert gemv is not None, "the Triton GEMV did not build"
    print(f"# {torch.cuda.get_device_name(0)}; torch {torch.__version__}; "
          f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")  # fmt: skip
    print(f"# command: python bench/gemv_bench.py {' '.join(sys.argv[1:])}")
    print(f"# copy bandwidth {bandwidth / 1e12:.3f} TB/s; us per matrix (x its bytes at that bandwidth)")
    print(
        "\n| shape | N x K | cuBLAS | Triton GEMV | Triton / cuBLAS | same, no PDL |\n|---|---|---|---|---|---|"
    )
    rows_out, sweep_out = [], []
    gen = torch.Generator(device=device).manual_seed(0)
    arch = InternVLArch.from_config_dict(model_shape(tiny=False).config)
    for tp in args.tp:
        for name, n, k, has_bias, count in shapes(arch, tp):
            copies = max(count, -(-200 * 2**20 // (n * k * 2)))  # >= 200 MB: out of L2
            ws = [
                (torch.randn(n, k, device=device, generator=gen) / k**0.5).bfloat16() for _ in range(copies)
            ]
            bs = [torch.randn(n, device=device, dtype=torch.bfloat16) if has_bias else None for _ in ws]
            floor_us = n * k * 2 / bandwidth * 1e6
            x = torch.randn(1, k, device=device, dtype=torch.bfloat16, generator=gen)
            ys = [torch.empty(1, n, device=device, dtype=torch.bfloat16) for _ in ws]

            def cublas(x=x, ws=ws, bs=bs, ys=ys):
                for w, b, y in zip(ws, bs, ys, strict=True):
                    torch.addmm(b, x, w.t(), out=y) if b is not None else torch.mm(x, w.t(), out=y)

            def ours(x=x, ws=ws, bs=bs):  # the server's path (its output allocated per call)
                for w, b in zip(ws, bs, strict=True):
                    gemv(x, w, b)

            def config(bn, bk, nw, pdl, x=x, ws=ws, bs=bs, ys=ys):
                def run():
                    for w, b, y in zip(ws, bs, ys, strict=True):
                        triton_call(x, w, b, y, bn, bk, nw, pdl)

                return run

            want = F.linear(x.float(), ws[0].float(), None if bs[0] is None else bs[0].float())
            err = (gemv(x, ws[0], bs[0]).float() - want).abs().max().item()
            assert err <= 1e-2 * want.abs().max().item() + 1e-2, f"{name}: max error {err}"
            t_cublas = time_graph(cublas) / len(ws) * 1e3
            t_ours = time_graph(ours) / len(ws) * 1e3
            t_no_pdl = time_graph(config(gemv.BLOCK_N, gemv.BLOCK_K, gemv.NUM_WARPS, False)) / len(ws) * 1e3
            row = {"shape": name, "n": n, "k": k, "cublas_us": t_cublas, "triton_us": t_ours,
                   "triton_no_pdl_us": t_no_pdl, "floor_us": floor_us}  # fmt: skip
            rows_out.append(row)
            print(
                f"| {name} | {n} x {k} | {t_cublas:.1f} ({t_cublas / floor_us:.2f}x) "
                f"| {t_ours:.1f} ({t_ours / floor_us:.2f}x) | {t_ours / t_cublas:.2f}x "
                f"| {t_no_pdl:.1f} ({t_no_pdl / floor_us:.2f}x) |"
            )
            if args.sweep:
                results = []
                for bn in (2, 4, 8, 16):
                    for bk in (512, 1024, 2048):
                        for nw in (2, 4):
                            if bn * bk <= 16384:
                                results.append(
                                    (time_graph(config(bn, bk, nw, True)) / len(ws) * 1e3, bn, bk, nw)
                                )
                results.sort()
                best = ", ".join(f"{t:.1f} us ({bn}, {bk}, {nw})" for t, bn, bk, nw in results[:4])
                print(f"|   sweep {name}: best (BLOCK_N, BLOCK_K, warps) {best}; floor {floor_us:.1f} us |")
                sweep_out.append({"shape": name, "results": results})
            del ws, bs, ys
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth": bandwidth, "rows": rows_out, "sweep": sweep_out}, f, indent=1)


if __name__ == "__main__":
    main()
