"""Start-up of `vlmd serve` (issue 16, item 4): from the command to /health answering, on kernel
caches that start empty, with the kernel precompile (the default: FlashInfer's modules compiled
side by side while the weights load) and without it (`--disable_kernel_precompile`: each module
compiled where it is first used, one after another), in one command; then a warm start on the
caches the first start filled. Each of those starts gets fresh FlashInfer and Triton cache folders
(FLASHINFER_WORKSPACE_BASE, TRITON_CACHE_DIR); the mode `as_is` starts on the environment's own
caches instead, and `--load_workers` repeats every mode for each LOADWORKER given (threads
reading the weights; the rest of the environment passes through). The actors' "ready" lines say
what each start spent its time on.

    python bench/cold_start_bench.py --model_dir /tmp/internvl3-8b [--modes cold,cold_no_precompile,warm]
    python bench/cold_start_bench.py --model_dir /tmp/internvl3-8b --modes as_is --load_workers 1 8
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_bench import serve  # noqa: E402

MODES = ("cold", "cold_no_precompile", "warm", "as_is")
READY = re.compile(r"supervisor INFO (\w+) ready \((.*)\)$")
# The worker's precompile: its jobs' times, or a job's failure.
PRECOMPILE = re.compile(r"(FlashInfer modules compiled ahead: .*|kernel precompile \S+ failed.*)$")


def start(model_dir: str, port: int, caches: Path | None, flags: list[str], log_dir: Path, env: dict) -> dict:
    """One start in `env`, on the kernel caches under `caches` (None: the environment's own):
    seconds to /health, each actor's ready line (role -> what it spent its time on), and the
    precompile's lines."""
    if caches is not None:
        env = env | {
            "FLASHINFER_WORKSPACE_BASE": str(caches / "flashinfer"),
            "TRITON_CACHE_DIR": str(caches / "triton"),
        }
    log_dir.mkdir(parents=True)
    started = time.perf_counter()
    with serve(model_dir, port, *flags, log_dir=log_dir, env=env):
        seconds = time.perf_counter() - started
    (log,) = log_dir.iterdir()
    lines = log.read_text().splitlines()
    phases = {m[1]: m[2] for line in lines if (m := READY.search(line))}
    precompile = [m[1] for line in lines if (m := PRECOMPILE.search(line))]
    return {"start_s": seconds, "phases": phases, "precompile": precompile}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated of {MODES}")
    parser.add_argument("--port", type=int, default=8441)
    parser.add_argument(
        "--load_workers", nargs="+", default=[], help="LOADWORKER values: every mode runs once with each"
    )
    parser.add_argument(
        "--serve_flags", default="--enable_multimodal", help="`vlmd serve` flags (one string)"
    )
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; pick from {MODES}")
    work = Path(tempfile.mkdtemp(prefix="cold_start-"))
    flags = args.serve_flags.split()
    results = {}
    for workers in args.load_workers or [None]:
        env = dict(os.environ) if workers is None else os.environ | {"LOADWORKER": workers}
        for mode in modes:
            name = mode if workers is None else f"{mode}, LOADWORKER={workers}"
            # "warm" reuses the caches "cold" filled (empty ones, if "cold" did not run first).
            caches = None if mode == "as_is" else work / ("cold" if mode == "warm" else mode) / "caches"
            extra = ["--disable_kernel_precompile"] if mode == "cold_no_precompile" else []
            log_dir = work / name.replace(", ", "-").replace("=", "") / "log"
            results[name] = start(args.model_dir, args.port, caches, flags + extra, log_dir, env)
            print(f"{name}: {results[name]['start_s']:.1f} s", file=sys.stderr, flush=True)
    print("| start | seconds to /health | actor | what it spent its time on |\n|---|---|---|---|")
    for mode, result in results.items():
        for i, (role, phases) in enumerate(sorted(result["phases"].items())):
            seconds = f"{result['start_s']:.1f}" if i == 0 else ""
            print(f"| {mode if i == 0 else ''} | {seconds} | {role} | {phases} |")
        for line in result["precompile"]:
            print(f"|  |  | worker (precompile) | {line} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
