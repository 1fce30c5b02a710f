"""ViT layouts on several GPUs: images per second of InternViT-300M + projector (InternVL3-8B's
vision side) split over ranks (--visual_tp) against whole replicas (--visual_dp), one run.

    python bench/vit_layout_bench.py [--batch_sizes 1 2 8] [--tiles 6] [--json PATH]
    python bench/vit_layout_bench.py --tiny   # a tiny float32 ViT on the CPU (gloo): checks the script

Layouts, each over the same number of devices (2 by default): one replica on one device (the
baseline), `visual_tp=2, visual_dp=1` (every rank runs every batch with half the heads and MLP,
all-reduces between), `visual_tp=1, visual_dp=2` (two whole replicas, each on its own device and
its own batches, run at the same time). A batch is `batch` images of `--tiles` 448 px tiles.
Random bf16 weights drawn on each device (`shard_vision` splits them as `vlmd serve` loads
them); the model runs op by op (the server's ViT graphs cover one image's tiles only). Images per
second: the layout's images over the wall time of `--repeats` batches after a warm-up, summed
over replicas. This times the ViT alone: decoding and preprocessing images are not included.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_bench import model_shape, sync  # noqa: E402
from ranks import free_port, join, random_share  # noqa: E402

from vlmd.models.config import InternVLArch  # noqa: E402
from vlmd.models.internvl import InternVLVision  # noqa: E402
from vlmd.models.tensor_parallel import TPGroup, end_rank_process, shard_vision  # noqa: E402


def rank_main(
    rank: int, size: int, visual_tp: int, port: int, args: argparse.Namespace, out_dir: str
) -> None:
    """One process of a layout: rank // visual_tp is its replica, rank % visual_tp its share."""
    # Each replica is its own world, as in the server; the layouts here split at most one.
    assert visual_tp == 1 or visual_tp == size, "one split replica, or replicas that are not split"
    device = join(rank, visual_tp, port, args.tiny)
    tp = TPGroup(rank % visual_tp, visual_tp)
    shape = model_shape(tiny=args.tiny)
    arch = InternVLArch.from_config_dict(shape.config)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model = random_share(InternVLVision, shard_vision, arch, tp, device, dtype)
    side = arch.image_size
    gen = torch.Generator().manual_seed(0)
    rates = {}
    with torch.inference_mode():
        for batch in args.batch_sizes:
            tiles = torch.randn(batch * args.tiles, 3, side, side, generator=gen).to(device, dtype)
            for _ in range(2):  # warm-up: kernels chosen, memory cached
                model(tiles)
            sync(device)
            started = time.perf_counter()
            for _ in range(args.repeats):
                model(tiles)
            sync(device)
            rates[batch] = batch * args.repeats / (time.perf_counter() - started)
    if tp.rank == 0:  # one report per replica
        with open(os.path.join(out_dir, f"replica{rank // visual_tp}.json"), "w") as f:
            json.dump(rates, f)
    end_rank_process(visual_tp)


def run_layout(visual_tp: int, visual_dp: int, args: argparse.Namespace) -> dict[int, float]:
    """Images per second at each batch size, summed over the layout's replicas."""
    size = visual_tp * visual_dp
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(rank_main, args=(size, visual_tp, free_port(), args, out_dir), nprocs=size)
        replicas = []
        for name in sorted(os.listdir(out_dir)):
            with open(os.path.join(out_dir, name)) as f:
                replicas.append({int(batch): rate for batch, rate in json.load(f).items()})
    assert len(replicas) == visual_dp
    return {batch: sum(r[batch] for r in replicas) for batch in args.batch_sizes}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2, help="devices per layout (visual_tp * visual_dp)")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--tiles", type=int, default=6, help="448 px tiles per image")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None)
    parser.add_argument("--tiny", action="store_true", help="a tiny float32 ViT on the CPU (gloo)")
    args = parser.parse_args(argv)
    if not args.tiny and torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"needs {args.gpus} GPUs; {torch.cuda.device_count()} visible")
    n = args.gpus
    layouts = {"one replica, one device": (1, 1), f"visual_tp={n}": (n, 1), f"visual_dp={n}": (1, n)}
    results = {}
    for name, (visual_tp, visual_dp) in layouts.items():
        print(f"{datetime.datetime.now():%H:%M:%S} {name}", file=sys.stderr, flush=True)
        results[name] = run_layout(visual_tp, visual_dp, args)
    device = "CPU (gloo)" if args.tiny else torch.cuda.get_device_name(0)
    print(f"# {device}; torch {torch.__version__}; {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"# command: python bench/vit_layout_bench.py {shlex.join(sys.argv[1:] if argv is None else argv)}")
    print(f"# {args.tiles} tiles per image; images/s (x one replica)\n")
    print("| layout | " + " | ".join(f"batch {b}" for b in args.batch_sizes) + " |")
    print("|---|" + "---|" * len(args.batch_sizes))
    base = results["one replica, one device"]
    for name, rates in results.items():
        cells = [f"{rates[b]:.1f} ({rates[b] / base[b]:.2f}x)" for b in args.batch_sizes]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for b in args.batch_sizes:
        tp_rate, dp_rate = results[f"visual_tp={n}"][b], results[f"visual_dp={n}"][b]
        print(f"# batch {b}: {'visual_dp' if dp_rate >= tp_rate else 'visual_tp'} wins")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tiles": args.tiles, "images_per_s": results}, f, indent=1)


if __name__ == "__main__":
    main()
