"""Load one component of an InternVL checkpoint (vision side or language model) from safetensors,
or from tensors already in memory (`*_from_state_dict`, for benchmarks that share weights).

The vision process and the LM process each read only their own tensors, and a tensor-parallel
rank only its rows of them. Where each parameter lies is the checkpoint layout's business
(`vlmd.models.layouts`: OpenGVLab's or transformers', packed q/k/v included); this module reads
what the layout names. A file without an LM head means tied embeddings (whatever the config
says). Any key outside the layout, any missing parameter and any shape mismatch is an error
naming the keys.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from vlmd.models.config import InternVLArch
from vlmd.models.decoder import CausalLM
from vlmd.models.internlm2 import InternLM2ForCausalLM
from vlmd.models.internvl import InternVLVision
from vlmd.models.layouts import LANGUAGE, VISION, Source, component_sources, preview
from vlmd.models.llama import LlamaForCausalLM
from vlmd.models.phi3 import Phi3ForCausalLM
from vlmd.models.qwen2 import Qwen2ForCausalLM
from vlmd.models.qwen3 import Qwen3ForCausalLM
from vlmd.models.tensor_parallel import SINGLE_RANK, Shard, TPGroup, shard_language_model, shard_vision

LANGUAGE_MODELS: dict[str, type[CausalLM]] = {
    "qwen2": Qwen2ForCausalLM,
    "llama": LlamaForCausalLM,
    "internlm2": InternLM2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "phi3": Phi3ForCausalLM,
}


def load_vision(
    model_dir: str | Path,
    dtype: torch.dtype | str,
    device: torch.device | str,
    num_threads: int = 1,
    tp: TPGroup = SINGLE_RANK,
) -> InternVLVision:
    """The vision tower and projector, in eval mode, on `device` in `dtype`; with `tp` of several
    ranks, this rank's share of the ViT (the projector whole), read from the files slice by slice."""
    arch = InternVLArch.from_model_dir(model_dir)
    files, sources = _component_sources(Path(model_dir), arch, VISION)
    with torch.device("meta"):
        model = InternVLVision(arch)
        shards = shard_vision(model, tp)
    _load_into(model, files, sources, _to_dtype(dtype), torch.device(device), num_threads, shards)
    return _finish(model, torch.device(device))


def load_language_model(
    model_dir: str | Path,
    dtype: torch.dtype | str,
    device: torch.device | str,
    num_threads: int = 1,
    tp: TPGroup = SINGLE_RANK,
) -> CausalLM:
    """The language model with its LM head, in eval mode, on `device` in `dtype`; with `tp` of
    several ranks, this rank's share of it, read from the files slice by slice."""
    arch = InternVLArch.from_model_dir(model_dir)
    files, sources = _component_sources(Path(model_dir), arch, LANGUAGE)
    # Like transformers 5: a head in the file is used even if the config asks for tying (HF
    # warns and unties), and a file without one means the embedding matrix is the head.
    arch = dataclasses.replace(arch, tie_word_embeddings="lm_head.weight" not in sources)
    with torch.device("meta"):
        model = LANGUAGE_MODELS[arch.text_family](arch)
        shards = shard_language_model(model, tp)
    _load_into(model, files, sources, _to_dtype(dtype), torch.device(device), num_threads, shards)
    model.tie_weights()  # point the head at the loaded embedding, not the meta placeholder
    return _finish(model, torch.device(device))


def vision_from_state_dict(
    arch: InternVLArch,
    state_dict: Mapping[str, torch.Tensor],
    dtype: torch.dtype | str,
    device: torch.device | str,
) -> InternVLVision:
    """`load_vision` from tensors in memory, keyed in `arch.layout` (e.g.
    `InternVLForConditionalGeneration.state_dict()`); keys of the language model are ignored.
    Tensors already in `dtype` on `device` that are parameters whole are shared with the caller,
    not copied."""
    sources = component_sources(arch, state_dict.keys(), VISION, "state dict")
    with torch.device("meta"):
        model = InternVLVision(arch)
    _assign_all(model, state_dict, sources, _to_dtype(dtype), device)
    return _finish(model, torch.device(device))


def language_model_from_state_dict(
    arch: InternVLArch,
    state_dict: Mapping[str, torch.Tensor],
    dtype: torch.dtype | str,
    device: torch.device | str,
) -> CausalLM:
    """`load_language_model` from tensors in memory, keyed in `arch.layout`; tensors already in
    `dtype` on `device` that are parameters whole are shared, not copied. Tied when `arch` says so
    (a tied model's state dict lists its head under its own key, holding the embedding's tensor)
    or when no head is given."""
    sources = component_sources(arch, state_dict.keys(), LANGUAGE, "state dict")
    tied = arch.tie_word_embeddings or "lm_head.weight" not in sources
    if tied:
        sources.pop("lm_head.weight", None)
    arch = dataclasses.replace(arch, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = LANGUAGE_MODELS[arch.text_family](arch)
    _assign_all(model, state_dict, sources, _to_dtype(dtype), device)
    model.tie_weights()
    return _finish(model, torch.device(device))


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Every tensor key of the checkpoint -> the safetensors file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        return {key: model_dir / name for key, name in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{model_dir}: neither model.safetensors nor model.safetensors.index.json")
    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def _component_sources(
    model_dir: Path, arch: InternVLArch, component: str
) -> tuple[dict[str, Path], dict[str, Source]]:
    """(every checkpoint key -> its file, the component's parameters -> where they lie)."""
    files = checkpoint_files(model_dir)
    return files, component_sources(arch, files.keys(), component, str(model_dir))


def _load_into(
    model: nn.Module,
    files: dict[str, Path],
    sources: dict[str, Source],
    dtype: torch.dtype,
    device: torch.device,
    num_threads: int,
    shards: Mapping[str, Shard] | None = None,
) -> None:
    """Replace every parameter of a model built on the meta device with its checkpoint rows
    (for parameters in `shards`, only the slice this rank holds: only that is read)."""
    shards = shards or {}
    params = _expect_parameters(model, sources.keys())
    # Each thread opens its own handle on a file and reads every num_threads-th of its tensors.
    num_threads = max(1, num_threads)
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in sorted(sources):
        by_file[files[sources[name].key]].append(name)
    chunks = [(path, names[i::num_threads]) for path, names in by_file.items() for i in range(num_threads)]

    def read(chunk: tuple[Path, list[str]]) -> list[tuple[str, torch.Tensor]]:
        path, names = chunk
        out = []
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in names:
                source = sources[name]
                tensor = _take(f.get_slice(source.key), source, shards.get(name), params[name])
                if device.type == "cuda":
                    # A view of the file's mapping copied to a GPU takes its page faults one by
                    # one during the transfer: into process memory first. On an H100 the 8B's
                    # 15 GB loaded in 27.5 s this way round, while read-then-copy took under 2 s
                    # (bench/load_bench.py times both, and the loader).
                    tensor = tensor.clone(memory_format=torch.contiguous_format)
                out.append((name, tensor.to(device=device, dtype=dtype)))
        return out

    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        for loaded in pool.map(read, [c for c in chunks if c[1]]):
            for name, tensor in loaded:
                _assign(model, name, params[name], tensor)


def _assign_all(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    sources: dict[str, Source],
    dtype: torch.dtype,
    device: torch.device | str,
) -> None:
    """Replace every parameter of a model built on the meta device with its tensor from memory."""
    params = _expect_parameters(model, sources.keys())
    for name, source in sources.items():
        tensor = _take(state_dict[source.key], source, None, params[name])
        _assign(model, name, params[name], tensor.to(device=device, dtype=dtype))


def _take(tensor, source: Source, shard: Shard | None, placeholder: nn.Parameter) -> torch.Tensor:
    """The parameter's values from its checkpoint tensor (a safetensors slice, read only where
    indexed, or a tensor): all of it, the rank's `shard` of it, or its rows of a packed tensor."""
    if not source.packed:
        return tensor[:] if shard is None else shard.take(tensor)
    start, length = (0, placeholder.shape[0]) if shard is None else (shard.start, shard.length)
    assert shard is None or shard.dim == 0, f"{source.key}: a packed tensor splits along its rows only"
    pieces = [tensor[first : first + count] for first, count in source.rows.ranges(start, length)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _expect_parameters(model: nn.Module, names) -> dict[str, nn.Parameter]:
    """The model's parameters by name, checked to be exactly `names`."""
    params = {name: p for name, p in model.named_parameters()}  # tied duplicates appear once
    missing, unexpected = sorted(params.keys() - set(names)), sorted(set(names) - params.keys())
    if missing or unexpected:
        kind = type(model).__name__
        raise ValueError(
            f"checkpoint does not match {kind}: missing {preview(missing)}, unexpected {preview(unexpected)}"
        )
    return params


def _finish(model: nn.Module, device: torch.device) -> nn.Module:
    stray = [name for name, p in model.named_parameters() if p.is_meta]
    assert not stray, f"parameters left unloaded: {stray}"
    model.to(device)  # buffers built on the CPU (rotary inv_freq) follow the weights
    if hasattr(model, "fuse"):
        model.fuse()  # loaded under HF's names; run with fused projections
    return model.eval().requires_grad_(False)


def _assign(model: nn.Module, name: str, placeholder: nn.Parameter, tensor: torch.Tensor) -> None:
    if tensor.shape != placeholder.shape:
        raise ValueError(
            f"{name}: checkpoint shape {tuple(tensor.shape)}, model expects {tuple(placeholder.shape)}"
        )
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False))


def _to_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return resolved
