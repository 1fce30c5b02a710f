"""Resolve the model- and machine-dependent facts every actor needs, before any actor starts.

Runs in the supervisor, so a bad flag or model directory fails fast, before weights load.
"""

from __future__ import annotations

import json
import os

import msgspec

from vlmd.actors.launch import RuntimeInfo
from vlmd.config import ENV_IMAGE_LENGTH, ConfigError, ServerArgs
from vlmd.core.page_allocator import pages_for
from vlmd.models.config import InternVLArch

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CPU_KV_SHARE = 0.25  # share of mem_fraction * available host memory the CPU KV cache may take
CPU_KV_MAX_BYTES = 2 * 2**30  # the CPU path serves tests and demos, not production loads


def resolve_runtime(args: ServerArgs, server_id: int, run_dir: str) -> RuntimeInfo:
    try:
        arch = InternVLArch.from_model_dir(args.model_dir)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise ConfigError("--model_dir", f"cannot serve {args.model_dir!r}: {exc}") from None
    if (classes := remote_code_tokenizer(args.model_dir)) is not None and not args.trust_remote_code:
        raise ConfigError(
            "--trust_remote_code",
            f"not given, but the tokenizer of {args.model_dir!r} ({classes}) is code shipped with "
            "the model; pass --trust_remote_code to load it",
        )
    if args.image_length != arch.image_seq_length:
        raise ConfigError(
            ENV_IMAGE_LENGTH,
            f"is {args.image_length} but the model makes {arch.image_seq_length} tokens per tile",
        )
    if (reason := arch.tensor_parallel_error(args.tp)) is not None:
        raise ConfigError("--tp", reason)
    if args.enable_multimodal and (reason := arch.vision_tensor_parallel_error(args.visual_tp)) is not None:
        raise ConfigError("--visual_tp", reason)
    device = resolve_device(args.device)
    if device == "cuda" and args.tp > _cuda_device_count():
        raise ConfigError("--tp", f"{args.tp} ranks need {args.tp} GPUs; {_cuda_device_count()} visible")
    dtype = model_dtype(args.data_type, device)
    embed_store, embed_rows = "", 0
    if args.enable_multimodal:
        row_bytes = arch.hidden_size * DTYPE_BYTES[dtype]
        embed_rows = args.embed_store_mb * 2**20 // row_bytes
        embed_store = f"vlmd-{server_id}-embeds"
    runtime = RuntimeInfo(
        server_id=server_id,
        run_dir=run_dir,
        device=device,
        dtype=dtype,
        hidden_size=arch.hidden_size,
        image_seq_length=arch.image_seq_length,
        num_kv_pages=0,
        max_req_total_len=0,
        max_model_len=arch.max_position_embeddings,
        conversation=arch.template,
        embed_store=embed_store,
        embed_store_rows=embed_rows,
    )
    if args.max_total_token_num is not None:
        return with_kv_pages(runtime, args, pages_for(args.max_total_token_num, args.page_size))
    if device == "cpu":
        return with_kv_pages(runtime, args, _cpu_kv_pages(args, arch, dtype))
    return runtime  # on CUDA the workers size the KV cache from what the weights leave free


def with_kv_pages(runtime: RuntimeInfo, args: ServerArgs, num_kv_pages: int) -> RuntimeInfo:
    """The runtime once the KV pool is known, with the request length limit it implies."""
    if num_kv_pages < 1:
        raise ConfigError("--mem_fraction", "leaves no memory for the KV cache")
    max_len = min(runtime.max_model_len, num_kv_pages * args.page_size)
    if args.max_req_total_len is not None:
        if args.max_req_total_len > max_len:
            raise ConfigError(
                "--max_req_total_len",
                f"{args.max_req_total_len} exceeds what the model and KV cache allow ({max_len})",
            )
        max_len = args.max_req_total_len
    return msgspec.structs.replace(runtime, num_kv_pages=num_kv_pages, max_req_total_len=max_len)


def remote_code_tokenizer(model_dir: str) -> str | None:
    """The classes of a tokenizer that ships as code beside the weights (InternLM2's), or None.
    vlmd never imports the model's own code; --trust_remote_code loads such a tokenizer."""
    path = os.path.join(model_dir, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        auto_map = json.load(f).get("auto_map") or {}
    classes = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else None
    if not classes:
        return None
    return ", ".join(c for c in (classes if isinstance(classes, list) else [classes]) if c)


def resolve_device(device: str) -> str:
    if device != "auto":
        if device == "cuda" and not _cuda_available():
            raise ConfigError("--device", "cuda was asked for but no CUDA device is visible")
        return device
    return "cuda" if _cuda_available() else "cpu"


def _cuda_available() -> bool:
    if not os.path.exists("/dev/nvidiactl"):
        return False  # spare the torch import on machines without an NVIDIA driver
    import torch

    return torch.cuda.is_available()


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()


def model_dtype(data_type: str, device: str) -> str:
    if data_type != "auto":
        return data_type
    return "float32" if device == "cpu" else "bfloat16"


def _cpu_kv_pages(args: ServerArgs, arch: InternVLArch, dtype: str) -> int:
    bytes_per_token = (
        2 * arch.num_hidden_layers * arch.num_key_value_heads * arch.head_dim * DTYPE_BYTES[dtype]
    )
    budget = min(CPU_KV_SHARE * args.mem_fraction * _available_host_bytes(), CPU_KV_MAX_BYTES)
    return max(1, int(budget // (bytes_per_token * args.page_size)))


def _available_host_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
