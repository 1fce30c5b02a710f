"""The `vlmd bench` flags, apart from the runner so that `vlmd serve` does not import it."""

from __future__ import annotations

import argparse
import math
import typing

from vlmd.sampling import KNOBS

BACKEND_NAMES = ("openai-chat", "vlmd")  # vlmd.benchmark.backends.BACKENDS


class BenchError(Exception):
    """The benchmark cannot run (bad flag, server down, no model name); the message says why."""


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--backend", default="vlmd", choices=BACKEND_NAMES, help="request format and stream parser")
    add("--base_url", default="http://127.0.0.1:8000", help="the server under test")
    add("--endpoint", default=None, help="path (default: /generate_stream, /v1/chat/completions)")
    add("--model", default=None, help="model name for openai-chat (default: the first of /v1/models)")
    add("--num_prompts", type=int, default=100, help="requests to send (warm-ups excluded)")
    add("--input_len", type=int, default=128, help="prompt tokens of text per request (random words)")
    add("--output_len", type=int, default=64, help="tokens to generate per request")
    add("--range_ratio", type=float, default=0.0, help="draw lengths from [len*(1-r), len*(1+r)]")
    add("--allow_eos", action="store_true", help="let requests stop at EOS (default: ignore_eos)")
    add("--images_per_request", type=int, default=0)
    add("--image_width", type=int, default=448)
    add("--image_height", type=int, default=448)
    add("--image_format", default="jpeg", choices=["jpeg", "png"])
    add(
        "--image_reuse_fraction",
        type=float,
        default=0.0,
        help="share of requests that send images of earlier requests again (embed-cache hits)",
    )
    add(
        "--image_pixel_pool",
        type=int,
        default=8,
        help="distinct pixel images drawn per run; each new image is still a file of its own (its "
        "serial number in a metadata chunk), so the server's caches miss it",
    )
    add(
        "--turns",
        type=int,
        default=1,
        help="turns per conversation: each turn sends the whole chat so far (its images again) and a "
        "new user message of --turn_input_len words; TTFT is reported for the first turn and the later "
        "ones (what a prefix cache saves)",
    )
    add("--turn_input_len", type=int, default=32, help="words of each user message after the first")
    add(
        "--disconnect_after",
        type=int,
        default=None,
        help="hang up each stream after this many generated tokens, whatever --output_len declared "
        "(clients that ask for long answers and leave early)",
    )
    add("--tokenizer", default=None, help="model dir whose tokenizer makes prompts exactly --input_len")
    add(
        "--request_rate", type=float, default=math.inf, help="requests/s, Poisson arrivals (inf: all at once)"
    )
    add("--max_concurrency", type=int, default=None, help="most requests in flight at once")
    add("--num_warmups", type=int, default=0, help="requests sent (and not measured) before the run")
    add("--request_timeout", type=float, default=600.0, help="seconds one request may take")
    add("--seed", type=int, default=0)
    add("--output_json", default=None, help="also write the report here")
    sampling = parser.add_argument_group("sampling (every request; none given: greedy)")
    for knob in BENCH_KNOBS:
        sampling.add_argument(f"--{knob.name}", type=_base_type(knob.type), default=None)


# The server's sampling knobs (`vlmd.sampling.KNOBS`), but the two the bench sets itself
# (ignore_eos from --allow_eos; --seed is the dataset's).
BENCH_KNOBS = tuple(knob for knob in KNOBS if knob.name not in ("ignore_eos", "seed"))


def _base_type(annotation) -> type:
    """float from Annotated[float, Meta(...)] | None, and the like."""
    while typing.get_args(annotation):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def sampling_knobs(ns: argparse.Namespace) -> dict:
    """The knobs given on the command line, as both APIs name them."""
    return {knob.name: value for knob in BENCH_KNOBS if (value := getattr(ns, knob.name)) is not None}


def validate(ns: argparse.Namespace) -> None:
    for name in ("num_prompts", "input_len", "output_len", "turns", "turn_input_len"):
        if getattr(ns, name) < 1:
            raise BenchError(f"--{name} must be at least 1")
    for name in ("num_warmups", "images_per_request"):
        if getattr(ns, name) < 0:
            raise BenchError(f"--{name} must not be negative")
    if ns.disconnect_after is not None and ns.disconnect_after < 1:
        raise BenchError("--disconnect_after must be at least 1")
    if not 0.0 <= ns.image_reuse_fraction <= 1.0:
        raise BenchError("--image_reuse_fraction must be in [0, 1]")
    if ns.image_pixel_pool < 1:
        raise BenchError("--image_pixel_pool must be at least 1")
    if not 0.0 <= ns.range_ratio < 1.0:
        raise BenchError("--range_ratio must be in [0, 1)")
    if ns.request_rate <= 0 or (ns.max_concurrency is not None and ns.max_concurrency < 1):
        raise BenchError("--request_rate and --max_concurrency must be positive")
