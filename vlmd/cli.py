"""`vlmd serve`, `vlmd bench`, `vlmd demo-model`: the command line."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from vlmd.benchmark.args import add_bench_arguments
from vlmd.config import ConfigError, add_serve_arguments, build_server_args

DEMO_MODEL_DIR = os.path.join(os.path.expanduser("~"), ".cache", "vlmd", "demo-model")
# vlmd.demo_opengvlab.BACKBONES (a test keeps them equal), spelt out so the parser needs no torch.
DEMO_BACKBONES = ("qwen2", "llama", "qwen3", "internlm2", "phi3")
DEMO_SIZES = ("tiny", "internvl3-8b")  # vlmd.demo.SIZES (not imported here: it imports torch)


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
    demo.add_argument(
        "--layout",
        choices=("hf", "opengvlab"),
        default="hf",
        help="transformers' format (the -hf repos) or OpenGVLab's own (internvl_chat)",
    )
    demo.add_argument(
        "--backbone",
        choices=DEMO_BACKBONES,
        default="qwen2",
        help="the language model; internlm2 in the hf layout is a Llama with a SentencePiece-style "
        "tokenizer, as transformers' conversions of InternLM2-backbone models are",
    )
    demo.add_argument(
        "--size",
        choices=DEMO_SIZES,
        default="tiny",
        help="tiny, or a real model's sizes with random weights (drawn on the GPU where there is one)",
    )
    ns = parser.parse_args(argv)
    if ns.command == "demo-model":
        return _demo_model(ns.path, ns.seed, ns.layout, ns.backbone, ns.size)
    if ns.command == "bench":
        from vlmd.benchmark.runner import run

        return run(ns)
    return _serve(serve, ns)


def _demo_model(path: str, seed: int, layout: str, backbone: str, size: str) -> int:
    import torch

    from vlmd.demo import write_demo_model
    from vlmd.demo_opengvlab import hf_demo_options, write_opengvlab_model

    options = hf_demo_options(backbone) | {"size": size}
    if size != "tiny" and torch.cuda.is_available():
        options["weights_device"] = "cuda"
    if layout == "hf":
        write_demo_model(path, seed=seed, **options)
    else:  # OpenGVLab's format is written from the HF-native model it converts to
        with tempfile.TemporaryDirectory() as hf_dir:
            write_demo_model(hf_dir, seed=seed, **options)
            write_opengvlab_model(hf_dir, path, backbone)
    print(f"vlmd: demo model ({size}, {layout} layout, {backbone}) written to {path}")
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
