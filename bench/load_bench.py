"""Where the LM worker's "weights" phase goes (issue 16, item 4): `vlmd serve` logged 31 to 72 s
for the 8B checkpoint's 15 GB with LOADWORKER unset, in the page cache or not. Each figure in
one process, on the same files:

- read: every language-model tensor copied out of its safetensors file into CPU memory (the
  page cache, or the disk where the pages are not cached);
- to device: the same tensors, each read into CPU memory (`get_tensor`), then `.to(device)`;
- to device from slice views: as the loader reads them (`get_slice(key)[:]`, a view of the file's
  mapping, no copy), then `.to(device)`;
- to device, staged: copied into a pinned buffer first, then to the device without waiting;
- load: `load_language_model` end to end, with each --threads count (LOADWORKER); with
  --profile, the functions its first load spent the most time in.

    python bench/load_bench.py --model_dir /tmp/internvl3-8b --threads 1 8

The first pass reads the files from wherever they are (run it after dropping the page cache for
a cold figure); the later ones find them in the page cache.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import os
import pstats
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vlmd.models.config import InternVLArch  # noqa: E402
from vlmd.models.layouts import LANGUAGE, component_sources  # noqa: E402
from vlmd.models.loader import checkpoint_files, load_language_model  # noqa: E402

STAGING_BYTES = 256 << 20


def language_tensors(model_dir: str) -> dict[Path, list[str]]:
    """The checkpoint keys the language model reads, by file."""
    files = checkpoint_files(Path(model_dir))
    sources = component_sources(InternVLArch.from_model_dir(model_dir), files.keys(), LANGUAGE, model_dir)
    by_file: dict[Path, list[str]] = {}
    for key in sorted({source.key for source in sources.values()}):
        by_file.setdefault(files[key], []).append(key)
    return by_file


def timed(name: str, run, num_bytes: int) -> None:
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    print(f"| {name} | {seconds:.2f} | {num_bytes / seconds / 1e9:.2f} |", flush=True)


def each_tensor(by_file: dict[Path, list[str]], use, sliced: bool = False) -> None:
    """`use(tensor)` for every tensor: read into CPU memory, or with `sliced`, a view of the file's
    mapping as `get_slice(key)[:]` gives it (the loader's read)."""
    for path, keys in by_file.items():
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in keys:
                use(f.get_slice(key)[:] if sliced else f.get_tensor(key))


def staged_copier(device: torch.device):
    """Copies through two pinned buffers: a buffer is refilled only once its last copy is done."""
    buffers = [torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    done = [torch.cuda.Event(), torch.cuda.Event()]
    turn = [0]

    def copy(tensor: torch.Tensor) -> torch.Tensor:
        source = tensor.contiguous().view(-1).view(torch.uint8)
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
        target = out.view(-1).view(torch.uint8)
        for start in range(0, source.numel(), STAGING_BYTES):
            i = turn[0] = (turn[0] + 1) % 2
            piece = source[start : start + STAGING_BYTES]
            done[i].synchronize()
            buffers[i][: piece.numel()].copy_(piece)
            target[start : start + piece.numel()].copy_(buffers[i][: piece.numel()], non_blocking=True)
            done[i].record()
        return out

    return copy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True)
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 8], help="LOADWORKER values to load with"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", action="store_true", help="profile one more load (1 thread)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    by_file = language_tensors(args.model_dir)
    num_bytes = 0

    def count(tensor: torch.Tensor) -> None:
        nonlocal num_bytes
        num_bytes += tensor.numel() * tensor.element_size()

    each_tensor(by_file, count)
    print(f"# {args.model_dir}: {num_bytes / 1e9:.2f} GB of language-model tensors; device {device}")
    print("| pass | seconds | GB/s |\n|---|---|---|")
    timed("read into CPU memory", lambda: each_tensor(by_file, lambda t: t.clone()), num_bytes)
    kept: list[torch.Tensor] = []  # the device copies stay until the pass's end, as loaded weights do

    def to_device(copy, sliced: bool = False) -> None:
        each_tensor(by_file, lambda t: kept.append(copy(t)), sliced)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        kept.clear()

    timed("to device (read, then .to)", lambda: to_device(lambda t: t.to(device)), num_bytes)
    timed(
        "to device from slice views (the loader's read, then .to)",
        lambda: to_device(lambda t: t.to(device), sliced=True),
        num_bytes,
    )
    if device.type == "cuda":
        timed("to device, staged through pinned buffers", lambda: to_device(staged_copier(device)), num_bytes)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for threads in args.threads:
        load = functools.partial(load_language_model, args.model_dir, dtype, device, num_threads=threads)
        timed(f"load_language_model, {threads} thread(s)", load, num_bytes)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(load_language_model, args.model_dir, dtype, device, num_threads=1)
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
