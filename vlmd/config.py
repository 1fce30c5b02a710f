"""ServerArgs: built once from the command line and the environment, frozen, passed explicitly.

This is the only module that reads vlmd's environment variables.
"""

from __future__ import annotations

import argparse
import math
import os

import msgspec

ENV_IMAGE_LENGTH = "INTERNVL_IMAGE_LENGTH"
ENV_LOAD_WORKERS = "LOADWORKER"
MAX_DEFAULT_PREPROCESS_WORKERS = 8
ENV_API_KEY = "VLMD_API_KEY"  # as vLLM's VLLM_API_KEY: keeps the key off the command line (ps)


class ConfigError(ValueError):
    """An inconsistent setting; the message starts with the flag or variable it concerns."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag


class ServerArgs(msgspec.Struct, frozen=True, kw_only=True):
    model_dir: str
    served_model_name: str | None = None  # the model's id in the OpenAI API (default: model_dir's name)
    host: str = "127.0.0.1"
    port: int = 8000
    tp: int = 1
    mem_fraction: float = 0.9
    trust_remote_code: bool = False
    enable_multimodal: bool = False
    visual_infer_batch_size: int = 1
    cache_capacity: int = 200
    visual_dp: int = 1
    visual_tp: int = 1
    # "process": each ViT rank is a vision process of its own beside its GPU's LM worker. "worker":
    # the ViT replica of group g runs inside LM worker g, on a low-priority CUDA stream, so that the
    # device runs the decode steps' kernels first (needs visual_tp 1).
    vit_placement: str = "process"
    # With vit_placement "worker": 0, the ViT runs beside the decode steps on its low-priority stream;
    # N > 0, while steps run the ViT encodes at most N tiles per step, between steps, on their stream.
    vit_step_tiles: int = 0
    # With vit_placement "worker" on a GPU: N > 0 runs the ViT on a CUDA green context of N SMs
    # (its blocks keep off the others, which the decode steps keep); 0: its stream may use them all.
    vit_sms: int = 0
    max_total_token_num: int | None = None
    max_req_total_len: int | None = None
    data_type: str = "auto"
    page_size: int = 16
    max_num_batched_tokens: int = 8192
    decode_step_prefill_tokens: int | None = None
    # N > 0: while requests decode, prompt spans run in side steps beside the decode steps, on a
    # CUDA green context of N SMs (the decode steps keep the rest); on the CPU, in turn with them.
    prefill_sms: int = 0
    # N > 0: every actor logs each time its event loop was held N ms or more past a 5 ms wake-up,
    # and a worker each decode step launched N ms or more after the one before (stalls that
    # delay tokens); 0: off.
    log_stalls_ms: float = 0
    max_running_requests: int = 256
    disable_prefix_cache: bool = False
    max_body_bytes: int = 64 * 1024 * 1024
    max_images_per_request: int = 16
    max_image_pixels: int = 50_000_000
    max_queued_requests: int = 1024
    image_fetch_timeout: float = 10.0  # seconds for a whole image download, redirects included
    # Seconds for a request's headers to arrive whole, and for each part of its body
    # (vlmd.actors.slow_clients).
    client_timeout: float = 30.0
    max_image_bytes: int = 32 * 2**20
    allow_private_image_urls: bool = False
    embed_store_mb: int = 1024
    min_tiles: int | None = None
    max_tiles: int | None = None
    image_length: int = 256  # INTERNVL_IMAGE_LENGTH: image tokens per tile
    load_workers: int = 1  # LOADWORKER: threads that read weights
    device: str = "auto"  # "auto" | "cpu" | "cuda"; resolved once by the supervisor
    torch_threads: int = 1  # intra-op threads of each torch actor (worker, vision) on the CPU
    # Processes that decode, tile and normalise images (vlmd.actors.preprocess); 0: a thread of the
    # asking actor. Resolved from the cores when not given (`default_preprocess_workers`).
    preprocess_workers: int = 1
    graph_max_batch_size: int = 64
    disable_cudagraph: bool = False
    disable_kernel_precompile: bool = False
    tp_all_reduce: str = "auto"  # "auto" | "nccl" | "symm_mem" | "fused": how the LM ranks sum on GPUs
    vit_attention: str = "auto"  # "auto" | "sdpa" | "flashinfer": the ViT's attention kernel on GPUs
    api_key: str | None = None  # --api_key or VLMD_API_KEY: every route but /health and /metrics needs it
    # Seconds a stopping server (SIGTERM, or one SIGINT) gives requests in flight to finish; as
    # Kubernetes' default grace period, which SIGKILLs a pod that takes longer.
    shutdown_timeout: float = 30.0
    # Seconds a step may run on the workers before the server stops as hung; 0: never. None: the
    # device's DEFAULT_STEP_TIMEOUT_S.
    step_timeout: float | None = None

    @property
    def vit_in_workers(self) -> bool:
        """The LM workers host the ViT replicas and load them themselves (no VisionLoaded)."""
        return self.enable_multimodal and self.vit_placement == "worker"


# --step_timeout by device: a GPU step takes milliseconds, so a minute is a hung worker (a stuck
# collective, a stopped process); a CPU step of a real model over a long prompt can take minutes.
DEFAULT_STEP_TIMEOUT_S = {"cuda": 60.0, "cpu": 600.0}


def step_timeout_s(args: ServerArgs, device: str) -> float | None:
    """--step_timeout on `device` in seconds, None when it is off."""
    timeout = DEFAULT_STEP_TIMEOUT_S[device] if args.step_timeout is None else args.step_timeout
    return timeout if 0 < timeout < math.inf else None


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The `vlmd serve` flags (LightLLM's names, so the user's commands work as written)."""
    add = parser.add_argument
    add("--model_dir", default=None, help="model directory (default: the built-in demo model)")
    add(
        "--served_model_name",
        default=None,
        help="the model's id in the OpenAI API (default: the model directory's name)",
    )
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=8000)
    add("--tp", type=int, default=1, help="tensor parallel degree of the language model")
    add("--mem_fraction", type=float, default=0.9, help="share of device memory vlmd may use")
    add(
        "--trust_remote_code",
        action="store_true",
        help="load a tokenizer that ships as code beside the weights (InternLM2's); vlmd never "
        "imports the model's own code",
    )
    add("--enable_multimodal", action="store_true", help="serve images (start the vision actor)")
    add("--visual_infer_batch_size", type=int, default=1, help="images per ViT batch")
    add("--cache_capacity", type=int, default=200, help="image embeddings kept in the MD5 cache")
    add("--visual_dp", type=int, default=None, help="ViT data-parallel replicas (default: tp / visual_tp)")
    add(
        "--visual_tp",
        type=int,
        default=None,
        help="ViT tensor-parallel degree (default: tp / visual_dp, so tensor parallel over all GPUs)",
    )
    add(
        "--vit_placement",
        default=_default("vit_placement"),
        choices=["process", "worker"],
        help="where each ViT replica runs: a vision process of its own beside each LM worker "
        "(process), or inside the LM worker of its GPU, on a CUDA stream of lower priority than the "
        "decode steps' (worker: one whole replica per GPU, --visual_tp 1, which is then the default) "
        "(default: %(default)s)",
    )
    add(
        "--vit_step_tiles",
        type=int,
        default=_default("vit_step_tiles"),
        help="with --vit_placement worker: while decode steps run, encode at most this many tiles per "
        "step, between steps (a bound on what images add to a token's latency); 0: no bound, the ViT "
        "runs beside the steps (default: %(default)s)",
    )
    add(
        "--vit_sms",
        type=int,
        default=_default("vit_sms"),
        help="with --vit_placement worker on a GPU: run the ViT on a CUDA green context of this many "
        "SMs, so that its kernels leave the others to the decode steps (needs torch's green-context "
        "streams); 0: the ViT's stream may use every SM (default: %(default)s)",
    )
    add(
        "--max_total_token_num", type=int, default=None, help="KV cache size in tokens (default: from memory)"
    )
    add("--max_req_total_len", type=int, default=None, help="max prompt + new tokens of one request")
    add(
        "--data_type",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="model dtype (default: float32 on the CPU, bfloat16 on CUDA)",
    )
    add("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the models run")
    add("--page_size", type=int, default=16, help="tokens per KV page")
    add("--max_num_batched_tokens", type=int, default=8192, help="token budget of one step")
    add(
        "--decode_step_prefill_tokens",
        type=int,
        default=None,
        help="in a step where requests decode, prefill at most this many prompt tokens beside them "
        "(default: the step budget): a shorter inter-token latency while prompts and images arrive, "
        "a slower prefill (bench/mixed_step_bench.py measures both)",
    )
    add(
        "--prefill_sms",
        type=int,
        default=_default("prefill_sms"),
        help="while requests decode, run prompt chunks (image rows included) not in the decode steps "
        "but in side steps beside them, on a CUDA green context of this many SMs, so that a decode "
        "step waits for no prompt (--tp 1; needs torch's green-context streams); 0: prompt chunks "
        "ride in the decode steps (default: %(default)s)",
    )
    add(
        "--log_stalls_ms",
        type=float,
        default=_default("log_stalls_ms"),
        help="log each time an actor's event loop was held this many ms, and each decode step a "
        "worker launched this many ms after the one before (finding what delays tokens); the first "
        "20 decode-step launches that take this long also write every thread's Python stack to the "
        "log (arming that costs a fraction of a ms of the worker's host time per step until then); "
        "0: off (default: %(default)s)",
    )
    add("--max_running_requests", type=int, default=256)
    add(
        "--disable_prefix_cache",
        action="store_true",
        help="compute every prompt whole (default: reuse the KV of cached prefixes, images included)",
    )
    add("--max_body_bytes", type=int, default=64 * 1024 * 1024, help="largest accepted request body")
    add(
        "--max_images_per_request",
        type=int,
        default=16,
        help="most images one request may carry (default: %(default)s)",
    )
    add(
        "--max_image_pixels",
        type=int,
        default=50_000_000,
        help="most pixels (width x height) of one image; a larger one is refused, "
        'or downscaled if the request sets "resize_to_fit": true on it (default: %(default)s)',
    )
    add(
        "--max_queued_requests",
        type=int,
        default=1024,
        help="most requests accepted and still waiting for their first token; "
        "beyond it: 503 with Retry-After (default: %(default)s)",
    )
    add(
        "--client_timeout",
        type=float,
        default=_default("client_timeout"),
        help="seconds a client has to send a request's headers (from connecting, or from the last "
        "response on the connection), and each part of its body after the one before; beyond it "
        "the connection is closed, or the request is a 408 (default: %(default)s)",
    )
    add(
        "--image_fetch_timeout",
        type=float,
        default=_default("image_fetch_timeout"),
        help="seconds to download an image URL, redirects included: a deadline for the whole "
        "download, not for each read (default: %(default)s)",
    )
    add(
        "--max_image_bytes",
        type=int,
        default=_default("max_image_bytes"),
        help="most bytes of one image, downloaded or sent in base64; a URL is refused as soon as "
        "it sends more (default: %(default)s)",
    )
    add(
        "--allow_private_image_urls",
        action="store_true",
        help="fetch image URLs from loopback, private, link-local and multicast addresses too "
        "(default: refused, checked on every redirect: a client could otherwise make the server "
        "fetch from its own network)",
    )
    add(
        "--embed_store_mb",
        type=int,
        default=_default("embed_store_mb"),
        help="shared-memory arena for image embeddings, allocated in /dev/shm at start: /dev/shm "
        "must hold it (Docker: --shm-size) (default: %(default)s)",
    )
    add(
        "--min_tiles",
        type=int,
        default=None,
        help="override the processor config's min_patches (OpenGVLab's config.json: min_dynamic_patch)",
    )
    add(
        "--max_tiles",
        type=int,
        default=None,
        help="override the processor config's max_patches (OpenGVLab's config.json: max_dynamic_patch); "
        "also the largest max_dynamic_patch a request may ask for",
    )
    add(
        "--graph_max_batch_size", type=int, default=64, help="largest decode batch replayed from a CUDA graph"
    )
    add("--disable_cudagraph", action="store_true", help="run decode steps op by op")
    add(
        "--disable_kernel_precompile",
        action="store_true",
        help="compile FlashInfer's modules where first used, one after another (default on CUDA: "
        "in parallel processes while the weights load; see vlmd.kernels.warm)",
    )
    add(
        "--tp_all_reduce",
        default="auto",
        choices=["auto", "nccl", "symm_mem", "fused"],
        help="with --tp on GPUs: sum decode-sized tensors with NCCL; with one kernel that reads "
        "every peer's copy through PyTorch symmetric memory (symm_mem); or in the same kernel as "
        "the residual add and RMSNorm that follow them (fused, FlashInfer). Larger ones always use "
        "NCCL. auto: fused where FlashInfer's fusion starts on every rank, else NCCL",
    )
    add(
        "--vit_attention",
        default="auto",
        choices=["auto", "sdpa", "flashinfer"],
        help="the ViT's attention on GPUs: torch SDPA (cuDNN's flash kernel) or FlashInfer's ragged "
        "prefill (FA3 on Hopper); auto: FlashInfer where it can serve the ViT, else SDPA; "
        "off GPUs always SDPA",
    )
    add(
        "--api_key",
        default=None,
        help=f"every route but /health and /metrics then needs `Authorization: Bearer KEY`, else a 401 "
        f"(default: the {ENV_API_KEY} environment variable, else no key)",
    )
    add(
        "--shutdown_timeout",
        type=float,
        default=_default("shutdown_timeout"),
        help="on SIGTERM (or one SIGINT) new requests get a 503 and those in flight get this many "
        "seconds to finish; then the rest are ended and the server stops. A second signal stops it "
        "at once (default: %(default)s)",
    )
    add(
        "--step_timeout",
        type=float,
        default=None,
        help="seconds a step may run on the workers (from when it could start) before the server "
        "stops as hung, with the reason in the log and exit code 1; the first step of each kind "
        "may take longer while kernels compile; 0: never "
        f"(default: {DEFAULT_STEP_TIMEOUT_S['cuda']:g} on GPUs, {DEFAULT_STEP_TIMEOUT_S['cpu']:g} on the CPU)",
    )
    add(
        "--torch_threads",
        type=int,
        default=None,
        help="CPU threads per torch actor (default: half the cores)",
    )
    add(
        "--preprocess_workers",
        type=int,
        default=None,
        help="processes that decode, tile and normalise images beside the ViT; 0 runs that on a "
        "thread of the http and vision actors (tests, debugging) (default: half the cores this "
        f"process may run on, at most {MAX_DEFAULT_PREPROCESS_WORKERS})",
    )


def _default(name: str):
    """A ServerArgs field's default: the one place it is written."""
    field = next(f for f in msgspec.structs.fields(ServerArgs) if f.name == name)
    return field.default


def build_server_args(ns: argparse.Namespace, environ: dict[str, str] | None = None) -> ServerArgs:
    """Validate the flags and environment; raise ConfigError naming the offending setting."""
    env = os.environ if environ is None else environ
    image_length = _env_int(env, ENV_IMAGE_LENGTH, 256)
    load_workers = _env_int(env, ENV_LOAD_WORKERS, 1)
    _check_positive(ns, "tp", "visual_infer_batch_size", "cache_capacity", "page_size")
    _resolve_vision_layout(ns)
    _check_positive(ns, "max_num_batched_tokens", "max_running_requests", "max_body_bytes", "embed_store_mb")
    _check_positive(ns, "graph_max_batch_size", "max_images_per_request", "max_image_pixels")
    _check_positive(ns, "max_queued_requests", "max_image_bytes")
    if not 0.0 < ns.mem_fraction <= 1.0:
        raise ConfigError("--mem_fraction", f"must be in (0, 1], got {ns.mem_fraction}")
    for flag in (
        "max_total_token_num",
        "max_req_total_len",
        "min_tiles",
        "max_tiles",
        "decode_step_prefill_tokens",
    ):
        value = getattr(ns, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag}", f"must be at least 1, got {value}")
    if ns.image_fetch_timeout <= 0:
        raise ConfigError("--image_fetch_timeout", "must be positive")
    if not 0 < ns.client_timeout < math.inf:
        raise ConfigError(
            "--client_timeout", f"must be a positive number of seconds, got {ns.client_timeout}"
        )
    if ns.shutdown_timeout < 0:
        raise ConfigError("--shutdown_timeout", f"must be at least 0, got {ns.shutdown_timeout}")
    if ns.step_timeout is not None and not ns.step_timeout >= 0:  # NaN too
        raise ConfigError("--step_timeout", f"must be at least 0, got {ns.step_timeout}")
    if ns.api_key == "":
        raise ConfigError("--api_key", "must not be empty")
    if ns.api_key is None:
        ns.api_key = env.get(ENV_API_KEY) or None  # set but empty: no key, as for the other variables
    if not os.path.isdir(ns.model_dir) or not os.access(ns.model_dir, os.R_OK | os.X_OK):
        raise ConfigError("--model_dir", f"{ns.model_dir!r} is not a readable directory")
    if ns.torch_threads is None:
        # Worker and vision share the cores: oversubscribed OpenMP threads spin and wait on each other.
        ns.torch_threads = max(1, (os.cpu_count() or 2) // 2)
    _check_positive(ns, "torch_threads")
    if ns.preprocess_workers is None:
        ns.preprocess_workers = default_preprocess_workers()
    if ns.preprocess_workers < 0:
        raise ConfigError("--preprocess_workers", f"must be at least 0, got {ns.preprocess_workers}")
    fields = {name: getattr(ns, name) for name in ServerArgs.__struct_fields__ if hasattr(ns, name)}
    return ServerArgs(**fields, image_length=image_length, load_workers=load_workers)


def _default(name: str):
    """A flag's default: its ServerArgs field's, so that it is written in one place."""
    return next(field.default for field in msgspec.structs.fields(ServerArgs) if field.name == name)


def default_preprocess_workers() -> int:
    """Half the cores this process may run on (the ViT, the LM worker and the http actor need the
    rest on a CPU-only machine), at least 1 and at most MAX_DEFAULT_PREPROCESS_WORKERS: a GPU ViT
    encodes images faster than one core preprocesses them, but not faster than a handful."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(MAX_DEFAULT_PREPROCESS_WORKERS, cores // 2))


def _resolve_vision_layout(ns: argparse.Namespace) -> None:
    """Fill in visual_dp / visual_tp: the ViT is tensor parallel over all `tp` GPUs unless told
    otherwise (with --vit_placement worker: one replica per GPU, the only layout it can run), and
    every GPU must carry one ViT share (visual_dp * visual_tp == tp)."""
    for name in ("visual_dp", "visual_tp"):
        value = getattr(ns, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name}", f"must be at least 1, got {value}")
    in_workers = ns.vit_placement == "worker"
    if ns.visual_dp is None and ns.visual_tp is None:
        ns.visual_dp, ns.visual_tp = (ns.tp, 1) if in_workers else (1, ns.tp)
    elif ns.visual_tp is None:
        ns.visual_tp = max(1, ns.tp // ns.visual_dp)
    elif ns.visual_dp is None:
        ns.visual_dp = max(1, ns.tp // ns.visual_tp)
    if ns.visual_dp * ns.visual_tp != ns.tp:
        raise ConfigError(
            "--visual_dp/--visual_tp",
            f"visual_dp * visual_tp must equal tp ({ns.visual_dp} * {ns.visual_tp} != {ns.tp})",
        )
    if ns.vit_step_tiles < 0 or (ns.vit_step_tiles and not in_workers):
        raise ConfigError(
            "--vit_step_tiles",
            f"must be 0, or at least 1 with --vit_placement worker (got {ns.vit_step_tiles} with "
            f"--vit_placement {ns.vit_placement})",
        )
    if ns.vit_sms < 0 or (ns.vit_sms and (not in_workers or ns.vit_step_tiles)):
        raise ConfigError(
            "--vit_sms",
            f"must be 0, or at least 1 with --vit_placement worker and --vit_step_tiles 0 (got "
            f"{ns.vit_sms} with --vit_placement {ns.vit_placement}, --vit_step_tiles {ns.vit_step_tiles})",
        )
    if ns.prefill_sms < 0 or (ns.prefill_sms and (ns.tp != 1 or ns.decode_step_prefill_tokens)):
        raise ConfigError(
            "--prefill_sms",
            f"must be 0, or at least 1 with --tp 1 and no --decode_step_prefill_tokens (got "
            f"{ns.prefill_sms} with --tp {ns.tp}, --decode_step_prefill_tokens "
            f"{ns.decode_step_prefill_tokens})",
        )
    if ns.log_stalls_ms < 0:
        raise ConfigError("--log_stalls_ms", f"must be 0 (off) or more (got {ns.log_stalls_ms})")
    if in_workers and ns.visual_tp != 1:
        # A worker hosts its group's whole replica: the ranks of a split ViT would be LM workers
        # meeting in a second torch.distributed world, and waiting on each other between steps.
        raise ConfigError(
            "--vit_placement",
            f"worker runs one whole ViT replica in each LM worker: it needs --visual_tp 1 "
            f"(got --visual_tp {ns.visual_tp}); use --vit_placement process for a split ViT",
        )


def _env_int(env, name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"must be an integer, got {raw!r}") from None
    if value < 1:
        raise ConfigError(name, f"must be at least 1, got {value}")
    return value


def _check_positive(ns: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(ns, name)
        if value < 1:
            raise ConfigError(f"--{name}", f"must be at least 1, got {value}")
