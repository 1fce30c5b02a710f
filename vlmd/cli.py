"""`vlmd serve`, `vlmd bench`, `vlmd demo-model`: the command line."""

from __future__ import annotations

import argparse
import os
import sys

from vlmd.benchmark.args import add_bench_arguments
from vlmd.config import ConfigError, add_serve_arguments, build_server_args

DEMO_MODEL_DIR = os.path.join(os.path.expanduser("~"), ".cache", "vlmd", "demo-model")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmd", description="A vision-language model inference server.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the server")
    add_serve_arguments(serve)
    bench = commands.add_parser(
        "bench",
        help="load-test a running server, report throughput and latency",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_bench_arguments(bench)
    demo = commands.add_parser("demo-model", help="write the tiny random-weight demo model")
    demo.add_argument("path")
    demo.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(argv)
    if ns.command == "demo-model":
        return _demo_model(ns.path, ns.seed)
    if ns.command == "bench":
        from vlmd.benchmark.runner import run

        return run(ns)
    return _serve(serve, ns)


def _demo_model(path: str, seed: int) -> int:
    from vlmd.demo import write_demo_model

    write_demo_model(path, seed=seed)
    print(f"vlmd: demo model written to {path}")
    return 0


def _serve(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> int:
    if ns.model_dir is None:
        ns.model_dir = _ensure_demo_model()
    try:
        args = build_server_args(ns)
    except ConfigError as exc:
        parser.exit(2, f"vlmd serve: error: {exc}\n")
    import uvloop

    from vlmd.actors.launch import setup_logging
    from vlmd.actors.supervisor import serve

    setup_logging("supervisor")
    try:
        return uvloop.run(serve(args))
    except ConfigError as exc:
        parser.exit(2, f"vlmd serve: error: {exc}\n")


def _ensure_demo_model() -> str:
    if not os.path.isfile(os.path.join(DEMO_MODEL_DIR, "config.json")):
        from vlmd.demo import write_demo_model

        print(f"vlmd: no --model_dir given; writing the demo model to {DEMO_MODEL_DIR}", file=sys.stderr)
        write_demo_model(DEMO_MODEL_DIR)
    return DEMO_MODEL_DIR


if __name__ == "__main__":
    sys.exit(main())
