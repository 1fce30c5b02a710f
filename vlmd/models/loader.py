"""Load one component of an InternVL checkpoint (vision side or language model) from safetensors,
or from tensors already in memory (`*_from_state_dict`, for benchmarks that share weights).

The vision process and the LM process each read only their own tensors. Two key layouts exist
on disk and both load:

    hub (transformers >= 4.52 conversions)   legacy (LLaVA style; transformers 5 save_pretrained)
    model.vision_tower.*                     vision_tower.*
    model.multi_modal_projector.*            multi_modal_projector.*
    model.language_model.*                   language_model.model.*
    lm_head.weight                           language_model.lm_head.weight

A file without an LM head means tied embeddings (whatever the config says). Any key outside these prefixes, any missing
parameter and any shape mismatch is an error naming the keys.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from vlmd.models.config import InternVLArch
from vlmd.models.internvl import InternVLVision
from vlmd.models.qwen2 import Qwen2ForCausalLM
from vlmd.models.tensor_parallel import SINGLE_RANK, Shard, TPGroup, shard_language_model, shard_vision

VISION, LANGUAGE = "vision", "language"

# (checkpoint prefix, component, prefix of the component's own parameter names); first match wins.
_KEY_PREFIXES = (
    ("model.vision_tower.", VISION, "vision_tower."),
    ("model.multi_modal_projector.", VISION, "multi_modal_projector."),
    ("model.language_model.", LANGUAGE, "model."),
    ("lm_head.", LANGUAGE, "lm_head."),
    ("vision_tower.", VISION, "vision_tower."),
    ("multi_modal_projector.", VISION, "multi_modal_projector."),
    ("language_model.model.", LANGUAGE, "model."),
    ("language_model.lm_head.", LANGUAGE, "lm_head."),
)


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
    keys = _component_keys(Path(model_dir), VISION)
    with torch.device("meta"):
        model = InternVLVision(arch)
        shards = shard_vision(model, tp)
    _load_into(model, keys, _to_dtype(dtype), torch.device(device), num_threads, shards)
    return _finish(model, torch.device(device))


def load_language_model(
    model_dir: str | Path,
    dtype: torch.dtype | str,
    device: torch.device | str,
    num_threads: int = 1,
    tp: TPGroup = SINGLE_RANK,
) -> Qwen2ForCausalLM:
    """The Qwen2 language model with its LM head, in eval mode, on `device` in `dtype`; with
    `tp` of several ranks, this rank's share of it, read from the files slice by slice."""
    arch = InternVLArch.from_model_dir(model_dir)
    keys = _component_keys(Path(model_dir), LANGUAGE)
    # Like transformers 5: a head in the file is used even if the config asks for tying (HF
    # warns and unties), and a file without one means the embedding matrix is the head.
    arch = dataclasses.replace(arch, tie_word_embeddings="lm_head.weight" not in keys)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(arch)
        shards = shard_language_model(model, tp)
    _load_into(model, keys, _to_dtype(dtype), torch.device(device), num_threads, shards)
    model.tie_weights()  # point the head at the loaded embedding, not the meta placeholder
    return _finish(model, torch.device(device))


def vision_from_state_dict(
    arch: InternVLArch,
    state_dict: Mapping[str, torch.Tensor],
    dtype: torch.dtype | str,
    device: torch.device | str,
) -> InternVLVision:
    """`load_vision` from tensors in memory (e.g. `InternVLForConditionalGeneration.state_dict()`,
    either key layout); keys of the language model are ignored. Tensors already in `dtype` on
    `device` are shared with the caller, not copied."""
    names = _component_names(state_dict, VISION, "state dict")
    with torch.device("meta"):
        model = InternVLVision(arch)
    _assign_all(model, {name: state_dict[key] for name, key in names.items()}, _to_dtype(dtype), device)
    return _finish(model, torch.device(device))


def language_model_from_state_dict(
    arch: InternVLArch,
    state_dict: Mapping[str, torch.Tensor],
    dtype: torch.dtype | str,
    device: torch.device | str,
) -> Qwen2ForCausalLM:
    """`load_language_model` from tensors in memory; tensors already in `dtype` on `device` are
    shared, not copied. Tied when `arch` says so (a tied model's state dict lists its head under
    its own key, holding the embedding's tensor) or when no head is given."""
    names = _component_names(state_dict, LANGUAGE, "state dict")
    tied = arch.tie_word_embeddings or "lm_head.weight" not in names
    if tied:
        names.pop("lm_head.weight", None)
    arch = dataclasses.replace(arch, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(arch)
    _assign_all(model, {name: state_dict[key] for name, key in names.items()}, _to_dtype(dtype), device)
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


def _component_keys(model_dir: Path, component: str) -> dict[str, tuple[Path, str]]:
    """The component's parameter name -> (file, checkpoint key), for every tensor it owns."""
    files = checkpoint_files(model_dir)
    names = _component_names(files, component, str(model_dir))
    return {name: (files[key], key) for name, key in names.items()}


def _component_names(keys: Iterable[str], component: str, source: str) -> dict[str, str]:
    """The component's parameter name -> checkpoint key, for every key it owns (either layout)."""
    out: dict[str, str] = {}
    unknown = []
    for key in keys:
        match = next((rule for rule in _KEY_PREFIXES if key.startswith(rule[0])), None)
        if match is None:
            unknown.append(key)
            continue
        prefix, owner, local_prefix = match
        if owner == component:
            name = local_prefix + key[len(prefix) :]
            if name in out:
                raise ValueError(f"{source}: {key} and {out[name]} are the same parameter")
            out[name] = key
    if unknown:
        raise ValueError(f"{source}: unrecognised checkpoint keys (not InternVL-hf): {_preview(unknown)}")
    return out


def _load_into(
    model: nn.Module,
    keys: dict[str, tuple[Path, str]],
    dtype: torch.dtype,
    device: torch.device,
    num_threads: int,
    shards: Mapping[str, Shard] | None = None,
) -> None:
    """Replace every parameter of a model built on the meta device with its checkpoint tensor
    (or, for parameters in `shards`, the slice of it this rank holds: only that is read)."""
    shards = shards or {}
    params = _expect_parameters(model, keys.keys())
    # Each thread opens its own handle on a file and reads every num_threads-th of its tensors.
    num_threads = max(1, num_threads)
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in sorted(keys):
        by_file[keys[name][0]].append(name)
    chunks = [(path, names[i::num_threads]) for path, names in by_file.items() for i in range(num_threads)]

    def read(chunk: tuple[Path, list[str]]) -> list[tuple[str, torch.Tensor]]:
        path, names = chunk
        out = []
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in names:
                key = keys[name][1]
                tensor = shards[name].take(f.get_slice(key)) if name in shards else f.get_tensor(key)
                out.append((name, tensor.to(device=device, dtype=dtype)))
        return out

    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        for loaded in pool.map(read, [c for c in chunks if c[1]]):
            for name, tensor in loaded:
                _assign(model, name, params[name], tensor)


def _assign_all(
    model: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device | str
) -> None:
    """Replace every parameter of a model built on the meta device with its tensor from memory."""
    params = _expect_parameters(model, tensors.keys())
    for name, tensor in tensors.items():
        _assign(model, name, params[name], tensor.to(device=device, dtype=dtype))


def _expect_parameters(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Parameter]:
    """The model's parameters by name, checked to be exactly `names`."""
    params = {name: p for name, p in model.named_parameters()}  # tied duplicates appear once
    missing, unexpected = sorted(params.keys() - set(names)), sorted(set(names) - params.keys())
    if missing or unexpected:
        kind = type(model).__name__
        raise ValueError(
            f"checkpoint does not match {kind}: missing {_preview(missing)}, unexpected {_preview(unexpected)}"
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


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)})" if keys else "none"
