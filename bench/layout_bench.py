"""Checkpoint layouts cost nothing at decode time: an InternVL2.5-8B-shaped language model (the
InternLM2-7B backbone: 32 layers, hidden 4096, GQA 32/8, vocab 92553) loaded from OpenGVLab's
layout (InternLM2 names, q/k/v packed in `wqkv`) against the same weights in transformers'
HF-native layout (a Llama text model), each against the memory-bandwidth roofline.

    python bench/layout_bench.py [--batch_sizes 1 64] [--new_tokens 128] [--json PATH]
    python bench/layout_bench.py --tiny   # a tiny float32 model on the CPU: checks the script

`python bench/gpu_bench.py --layouts` runs it after the InternVL3-8B figures, in the same run.

Random bf16 weights are drawn once under the HF-native keys; the OpenGVLab state dict is their
inverse conversion (`vlmd.demo_opengvlab.opengvlab_weights`), and each model is built through
the loader's layout rules (`language_model_from_state_dict`), as `vlmd serve` reads either
checkpoint. Decode steps are timed as in gpu_bench (overlapped, CUDA graphs), the two layouts
alternating `--rounds` times at each batch; the figure is the median over rounds.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_bench import (  # noqa: E402
    PAGE_SIZE,
    add_text_requests,
    copy_bandwidth,
    full_batch_decode,
    lm_weight_bytes,
    model_shape,
    run_steps,
)

from vlmd.actors.worker import make_runner  # noqa: E402
from vlmd.core.page_allocator import pages_for  # noqa: E402
from vlmd.core.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from vlmd.demo_opengvlab import opengvlab_config, opengvlab_weights  # noqa: E402
from vlmd.models.config import InternVLArch  # noqa: E402
from vlmd.models.loader import LANGUAGE_MODELS, language_model_from_state_dict  # noqa: E402

TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "vocab_size")  # fmt: skip
SHAPES = {"full": (4096, 14336, 32, 32, 8, 128, 92553), "tiny": (128, 256, 2, 4, 2, 32, 512)}
LAYOUTS = ("opengvlab", "hf")
log = logging.getLogger("layout_bench")


def hf_config(tiny: bool) -> dict:
    """config.json of the HF-native conversion: gpu_bench's InternVL with InternLM2-7B's shape as
    a Llama text model (as transformers converts InternVL2.5-8B)."""
    config = dict(model_shape(tiny).config)
    config["text_config"] = dict(zip(TEXT_KEYS, SHAPES["tiny" if tiny else "full"], strict=True)) | {
        "model_type": "llama",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 32768,
        "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }
    config["vision_config"] = config["vision_config"] | {"num_channels": 3}
    config["image_token_id"] = 92546 % config["text_config"]["vocab_size"]
    return config


@torch.no_grad()
def random_hub_state(arch: InternVLArch, device: torch.device, dtype: torch.dtype) -> dict:
    """The language model's random weights under transformers' hub keys: matrices N(0, 0.02),
    norm gains 1, biases 0."""
    with torch.device("meta"):
        names = [(name, p.shape) for name, p in LANGUAGE_MODELS[arch.text_family](arch).named_parameters()]
    gen = torch.Generator(device=device).manual_seed(0)
    state = {}
    for name, shape in names:
        tensor = torch.empty(shape, device=device, dtype=dtype)
        if len(shape) >= 2:
            tensor.normal_(0.0, 0.02, generator=gen)
        else:
            tensor.fill_(0.0 if name.endswith(".bias") else 1.0)
        key = (
            "lm_head.weight" if name == "lm_head.weight" else "model.language_model." + name[len("model.") :]
        )
        state[key] = tensor
    return state


def build(tiny: bool, device: torch.device, dtype: torch.dtype) -> dict[str, tuple]:
    """layout -> (vlmd's language model, its arch), both from the same weights."""
    config = hf_config(tiny)
    archs = {
        "hf": InternVLArch.from_config_dict(config),
        "opengvlab": InternVLArch.from_config_dict(opengvlab_config(config, "internlm2")),
    }
    assert (archs["hf"].text_family, archs["opengvlab"].text_family) == ("llama", "internlm2")
    hub = random_hub_state(archs["hf"], device, dtype)
    states = {"hf": hub, "opengvlab": opengvlab_weights(hub, config, "internlm2")}
    assert any(key.endswith("attention.wqkv.weight") for key in states["opengvlab"])
    models = {
        layout: (language_model_from_state_dict(archs[layout], states[layout], dtype, device), archs[layout])
        for layout in LAYOUTS
    }
    del hub, states  # the models hold fused copies of what they do not share
    gc.collect()
    hf_params = dict(models["hf"][0].named_parameters())
    for name, param in models["opengvlab"][0].named_parameters():
        assert torch.equal(param, hf_params[name]), f"{name} differs between the layouts"
    return models


def decode_ms(runner, scheduler: Scheduler, prompts: torch.Tensor, new_tokens: int, tag: str) -> float:
    """Median ms of the full-batch decode steps (overlapped, as served)."""
    add_text_requests(scheduler, prompts, new_tokens, tag)
    decode = full_batch_decode(run_steps(runner, scheduler), prompts.shape[0])
    return statistics.median(s.interval_s for s in decode) * 1e3


def measure(args: argparse.Namespace, bandwidth: float | None = None) -> dict:
    """Decode ms per step of each layout at each batch, against the roofline."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if bandwidth is None:
        bandwidth = copy_bandwidth(device, args.copy_mib * 2**20, 5)
    models = build(args.tiny, device, dtype)
    max_batch = max(args.batch_sizes)
    num_pages = max_batch * pages_for(args.prompt_len + args.new_tokens, PAGE_SIZE)
    graphs = 0 if device.type == "cpu" else max_batch
    serving = {}
    for layout, (lm, arch) in models.items():
        runner = make_runner(lm, arch, num_pages=num_pages, page_size=PAGE_SIZE, graph_max_batch_size=graphs)
        config = SchedulerConfig(  # rounds repeat their prompts: no prefix cache (see gpu_bench)
            num_pages, PAGE_SIZE, max_running_requests=max(256, max_batch), enable_prefix_cache=False
        )
        scheduler = Scheduler(config)
        serving[layout] = (runner, scheduler)
    gen = torch.Generator().manual_seed(1)
    vocab = models["hf"][1].vocab_size
    warmup = torch.randint(0, vocab, (max_batch, args.prompt_len), generator=gen)
    for layout, (runner, scheduler) in serving.items():
        log.info("warm-up of the %s layout", layout)
        # As long as a timed run: the prompts prefill in chunks, and a short warm-up's first
        # requests would finish before its last ones prefill (no step at the full batch).
        decode_ms(runner, scheduler, warmup, args.new_tokens, f"warmup-{layout}")
    rows = []
    for batch in args.batch_sizes:
        prompts = torch.randint(0, vocab, (batch, args.prompt_len), generator=gen)
        times: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
        for i in range(args.rounds):
            for layout in LAYOUTS if i % 2 == 0 else LAYOUTS[::-1]:
                runner, scheduler = serving[layout]
                times[layout].append(
                    decode_ms(runner, scheduler, prompts, args.new_tokens, f"{layout}{batch}-{i}")
                )
        lm, arch = models["hf"]
        elem = torch.empty((), dtype=dtype).element_size()
        avg_context = args.prompt_len + args.new_tokens / 2
        kv_bytes = (
            batch * avg_context * 2 * arch.num_hidden_layers * arch.num_key_value_heads * arch.head_dim * elem
        )
        roofline_ms = (lm_weight_bytes(lm) + kv_bytes) / bandwidth * 1e3
        row = {"batch": batch, "roofline_ms": roofline_ms}
        for layout in LAYOUTS:
            row[f"{layout}_step_ms"] = statistics.median(times[layout])
            row[f"{layout}_rounds_ms"] = times[layout]
            row[f"{layout}_over_roofline"] = row[f"{layout}_step_ms"] / roofline_ms
        row["opengvlab_over_hf"] = row["opengvlab_step_ms"] / row["hf_step_ms"]
        rows.append(row)
    for _, scheduler in serving.values():
        scheduler.check_integrity()
    assert all(lm_weight_bytes(models[layout][0]) == lm_weight_bytes(models["hf"][0]) for layout in LAYOUTS)
    return {"lm_weight_bytes": lm_weight_bytes(models["hf"][0]), "rows": rows}


def report(out: dict) -> str:
    lines = [
        f"Checkpoint layouts, InternVL2.5-8B-shaped language model (InternLM2-7B backbone), LM weights "
        f"read per step {out['lm_weight_bytes'] / 1e9:.2f} GB: OpenGVLab's layout (packed wqkv) against "
        "the same weights in the HF-native layout (Llama); median over rounds",
        "",
        "| batch | OpenGVLab ms/step | HF-native ms/step | OpenGVLab / HF-native | roofline ms "
        "| OpenGVLab / roofline | HF-native / roofline |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        lines.append(
            f"| {r['batch']} | {r['opengvlab_step_ms']:.2f} | {r['hf_step_ms']:.2f} | {r['opengvlab_over_hf']:.3f}x "
            f"| {r['roofline_ms']:.2f} | {r['opengvlab_over_roofline']:.3f}x | {r['hf_over_roofline']:.3f}x |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rounds", type=int, default=4, help="timed runs of each layout per batch, alternating"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny float32 model on the CPU")
    parser.add_argument("--batch_sizes", type=int, nargs="+")
    parser.add_argument("--prompt_len", type=int)
    parser.add_argument("--new_tokens", type=int)
    parser.add_argument("--json", help="also write every figure to this file")
    add_arguments(parser)
    args = parser.parse_args(argv)
    defaults = (
        {"batch_sizes": [1, 3], "prompt_len": 16, "new_tokens": 6}
        if args.tiny
        else {"batch_sizes": [1, 64], "prompt_len": 512, "new_tokens": 128}
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device, args.dtype = ("cpu", "float32") if args.tiny else ("cuda", "bfloat16")
    args.copy_mib = 32 if args.tiny else 2048
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)7.0f ms %(name)s: %(message)s")
    out = measure(args)
    print(report(out))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
