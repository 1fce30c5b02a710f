"""Every message that crosses a process boundary, in one place.

Messages are msgpack-encoded msgspec Structs sent over Unix domain sockets (see `vlmd.ipc`).
No tensors, pixels or pickles travel here: large payloads live in shared memory and a message
names the segment. Tags make one decoder handle every message type.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

MAX_TOP_LOGPROBS = 20
MAX_TOP_K = 2**31 - 1
MIN_SAMPLING_TEMPERATURE = 1e-5  # as vLLM's _SAMPLING_EPS: below it, greedy


class Message(msgspec.Struct, tag=True, array_like=True, omit_defaults=True, gc=False):
    """Base of every cross-process message."""


class SamplingParams(msgspec.Struct, omit_defaults=True, gc=False, frozen=True):
    """How a request picks its tokens: the one definition of every sampling parameter, its type,
    default and valid range. `vlmd.sampling` validates against it, and both APIs' bodies take
    their sampling fields from it (`vlmd.sampling.SamplingKnobs`): a new parameter is a field
    here and its use in `vlmd.kernels.sampler`."""

    max_new_tokens: Annotated[int, Meta(ge=1)] = 16
    do_sample: bool = False
    temperature: Annotated[float, Meta(ge=0.0, le=100.0)] = 1.0  # 0 (or < 1e-5) is greedy
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    # -1 or 0: the whole vocabulary. Bounded because every int of a message must fit msgpack's
    # 64 bits; any k beyond the vocabulary keeps all of it anyway.
    top_k: Annotated[int, Meta(ge=-1, le=MAX_TOP_K)] = -1
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] = (
        0.0  # keep tokens at least this times as likely as the best
    )
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=100.0)] = 1.0
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] = (
        0.0  # OpenAI: minus, once a token was generated
    )
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] = (
        0.0  # OpenAI: minus, per time it was generated
    )
    ignore_eos: bool = False
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)] = 0  # alternatives with each token

    @property
    def greedy(self) -> bool:
        # Below MIN_SAMPLING_TEMPERATURE, 1 / temperature overflows float32 in the sampler (NaN
        # probabilities); greedy is what sampling tends to as the temperature goes to 0.
        return not self.do_sample or self.temperature < MIN_SAMPLING_TEMPERATURE


class ImageRef(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One image of a request: where its bytes are and which prompt positions it fills."""

    # Embed-cache key: hex MD5 of the original image bytes, or, where a setting changes the
    # embeddings (a resize, a tile limit), of that MD5 and the settings (`vlmd.actors.images`).
    md5: str
    # Shared-memory segment of the original bytes, one per key, shared by every request that
    # needs them; the http actor unlinks it once none does (`vlmd.shm.SharedBytes`).
    bytes_shm: str
    num_bytes: int
    num_tiles: int
    token_offset: int  # prompt index of the first <IMG_CONTEXT> token of this image
    num_tokens: int  # embedding rows = num_tiles * image_seq_length
    resize_width: int = 0  # > 0: the vision actor downscales the decoded image to this size first
    resize_height: int = 0
    max_tiles: int = 0  # > 0: the request's tile limit (max_dynamic_patch); 0: the server's
    # Shared-memory segment of its normalised tiles, float32 [num_tiles, 3, tile, tile], when the
    # http actor has them (it preprocessed the bytes, or another request of the key holds them);
    # "": the vision front has them made from the bytes if the embed cache misses.
    pixels_shm: str = ""


class HistogramSnapshot(msgspec.Struct, array_like=True, gc=False):
    """A fixed-bucket histogram's state; `vlmd.actors.metrics` renders it with cumulative buckets."""

    bounds: list[float]  # finite upper edges (Prometheus `le`), increasing
    counts: list[int]  # observations per bucket, not cumulative; len(bounds) + 1, the last is +Inf
    sum: float


class TopLogprobs(msgspec.Struct, array_like=True, gc=False):
    """The most likely tokens at one position, best first, with their logprobs under the model's
    raw distribution (before temperature and penalties, like the sampled token's logprob)."""

    token_ids: list[int]
    logprobs: list[float]


class EmbedRun(msgspec.Struct, array_like=True, gc=False):
    """A run of embedding rows in the shared EmbedStore."""

    md5: str
    row_offset: int
    num_rows: int


# --- control -------------------------------------------------------------------------------


class Hello(Message):
    """First message on every connection: who is speaking."""

    role: str
    rank: int = 0
    num_kv_pages: int = 0  # workers: the KV pool they allocated


class Ready(Message):
    """An actor finished starting; `detail` is logged by the supervisor."""

    role: str
    rank: int = 0
    detail: str = ""
    num_kv_pages: int = 0  # workers: the KV pool they allocated


class VisionLoaded(Message):
    """Supervisor -> workers: every vision rank is ready, so its device memory is taken; a worker
    sizes its KV cache from what is left only after this (it loads and compiles meanwhile)."""


class StartServing(Message):
    """Supervisor -> http actor, once every LM worker is ready: the KV pool they sized and the
    request length limit it implies. The http actor loads beside the workers (its imports and the
    tokenizer) and opens its port only after this."""

    num_kv_pages: int
    max_req_total_len: int


class Shutdown(Message):
    """Supervisor -> http actor, on SIGTERM (or a first SIGINT): refuse new requests (503), let
    those in flight finish for up to `timeout_s` seconds, end the rest, then answer Drained. The
    supervisor stops every actor after that, as on any stop."""

    timeout_s: float


class Drained(Message):
    """Http actor -> supervisor: the drain is over, the server may stop. Every request finished,
    or was ended at the timeout; one whose error did not go out within the http actor's grace
    (END_GRACE_S) is closed when the process stops."""

    num_ended: int = 0  # requests still running at the timeout, ended with an error


class Fatal(Message):
    """An actor -> supervisor: the server cannot go on although every actor is alive (a worker
    hung past --step_timeout); the supervisor stops it as it does when an actor dies."""

    reason: str


# --- http <-> scheduler --------------------------------------------------------------------


class SubmitRequest(Message):
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    images: list[ImageRef] = []
    stop_token_seqs: list[list[int]] = []  # generation stops when output ends with one of these
    eos_token_ids: list[int] = []


class TokenOut(Message):
    """New tokens of one request; the last one carries the finish reason."""

    request_id: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None = None  # "stop" | "length" | None while running
    num_stop_tokens: int = 0  # trailing tokens that matched a stop sequence: not shown to the user
    top_logprobs: list[TopLogprobs] = []  # aligned with token_ids when the request asked for them
    num_cached_tokens: int = 0  # with the first token: prompt tokens found in the prefix cache


class RequestFailed(Message):
    """The request cannot be served; `status` is the HTTP status to answer with."""

    request_id: str
    status: int
    message: str


class Abort(Message):
    """The client is gone or no longer wants the request: free everything it holds."""

    request_id: str


class GetMetrics(Message):
    query_id: int


class MetricsSnapshot(Message):
    query_id: int
    values: dict[str, float]
    histograms: dict[str, HistogramSnapshot] = {}


# --- scheduler <-> vision ------------------------------------------------------------------


class EncodeImages(Message):
    """Make the embeddings of these images available and pin them for the request."""

    request_id: str
    images: list[ImageRef]


class ImagesReady(Message):
    request_id: str
    runs: list[EmbedRun]  # one per image, in request order
    counters: dict[str, float]  # vision counters and gauges after this batch, for /metrics
    histograms: dict[str, HistogramSnapshot] = {}  # vision histograms, likewise


class VisionStats(Message):
    """Vision -> scheduler, whenever pins change without an ImagesReady (a release, the end of a
    batch): the vision actor's counters and gauges for /metrics, as ImagesReady carries them."""

    counters: dict[str, float]
    histograms: dict[str, HistogramSnapshot] = {}


class ImagesFailed(Message):
    request_id: str
    status: int
    message: str


class ReleaseImages(Message):
    """The request finished or was aborted: unpin its images."""

    request_id: str


# --- vision front <-> ViT replicas ------------------------------------------------------------


class EncodeBatch(Message):
    """Vision front -> the leader of a ViT replica: encode these images and write each one's rows
    into the EmbedStore run the front reserved for it."""

    batch_id: int
    images: list[ImageRef]
    runs: list[EmbedRun]  # one per image, num_rows == image.num_tokens


class BatchEncoded(Message):
    """Leader -> vision front: the batch is done; the rows of every image without an error are in
    the EmbedStore."""

    batch_id: int
    errors: list[str]  # one per image: "" when its rows are written, else why it failed


class ForwardTiles(Message):
    """Leader of a tensor-parallel ViT group -> its other ranks: join the broadcast of
    `num_tiles` tiles and run your share of the forward. Ranks enter a collective only when told,
    so none ever waits idle inside one."""

    num_tiles: int


# --- http actor / vision front <-> preprocess workers -------------------------------------------


class PreprocessImage(Message):
    """Decode, check, tile and normalise one image; write its tiles into a new segment `pixels_shm`
    (`vlmd.actors.preprocess`). The bytes are in the segment `bytes_shm`, which the asker holds
    until the answer (the worker copies them out in its own process, not the asker's event loop
    through a socket), or, with no segment, in `data`."""

    job_id: int
    data: bytes  # b"" where they are in bytes_shm
    pixels_shm: str
    max_pixels: int  # --max_image_pixels: beyond it refused from the header, unless resize_to_fit
    resize_to_fit: bool = False  # beyond max_pixels: downscale (vlmd.image.fit_within) instead
    max_tiles: int = 0  # the request's tile limit; 0: the server's
    bytes_shm: str = ""
    num_bytes: int = 0  # in bytes_shm


class ImagePreprocessed(Message):
    """A preprocess worker's answer; without `error_kind` the tiles are in the job's segment."""

    job_id: int
    worker: int  # the worker's rank (for /metrics)
    width: int = 0  # upright decoded size, before any downscale
    height: int = 0
    num_tiles: int = 0
    error: str = ""
    error_kind: str = ""  # "" | "bad" (400) | "too_large" (400, width/height set) | "no_shm" (503) | "gone"
    seconds: float = 0.0  # the worker's own time on the job (decode, tiles, segment), for /metrics


# --- scheduler <-> TP rank workers ----------------------------------------------------------


class EmbedSlice(msgspec.Struct, array_like=True, gc=False):
    """EmbedStore rows [row_offset, row_offset + num_rows) replace the span's input embeddings
    starting at span index dst_offset."""

    row_offset: int
    num_rows: int
    dst_offset: int


# A step's input id for the token this request sampled in the step launched just before: the
# scheduler plans a step before the previous one returns, and the worker fills it in on the device.
PENDING_TOKEN = -1


class StepItem(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One request's share of a step: compute the tokens [start, start + len(token_ids))."""

    request_id: str
    start: int  # tokens already in the KV cache
    token_ids: list[int]  # input ids of the span (image positions hold the image token id; the
    # last may be PENDING_TOKEN)
    new_pages: list[int] = []  # pages appended to the request's page table before this step
    embeds: list[EmbedSlice] = []
    sample: bool = True  # the span reaches the newest known token: sample the next one


class NewRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Sent with the first step of a request: what sampling needs for its whole life."""

    request_id: str
    sampling: SamplingParams
    prompt_ids: list[int]  # for the repetition penalty


class StepPlan(Message):
    """The only contract between the scheduler and the workers; every rank executes it."""

    step_id: int
    items: list[StepItem]
    new_requests: list[NewRequest] = []
    finished_ids: list[str] = []  # drop per-request state (sampler, page table) before this step
    # Forget these requests' page tables before this step (their KV is gone); keep their samplers:
    # they come back with every token computed again, from position 0.
    preempted_ids: list[str] = []
    # A side step (--prefill_sms): prompt spans only, run beside the decode steps and answered
    # whenever it ends; its requests are in no other step meanwhile.
    side: bool = False
    # When the scheduler sent it (time.monotonic(), one clock for every process of the host):
    # with --log_stalls_ms a worker tells a plan that came late from one it was too busy to read.
    sent_at: float = 0.0


class FlushStep(Message):
    """Scheduler -> workers: no plan follows for now, so return the last step's result.

    A worker launches a step before it reads back the previous one's tokens, so that the GPU
    never waits for the host; without a next plan it would hold the last result forever.
    """


class StepResult(Message):
    """Rank 0's answer: one sampled token per item with `sample` set, in item order."""

    step_id: int
    request_ids: list[str]
    token_ids: list[int]
    logprobs: list[float]
    # One per sampled item when any request of the step asked for alternatives (empty for the others).
    top_logprobs: list[TopLogprobs] = []


ANY_MESSAGE = (
    Hello
    | Ready
    | VisionLoaded
    | StartServing
    | Shutdown
    | Drained
    | Fatal
    | SubmitRequest
    | TokenOut
    | RequestFailed
    | Abort
    | GetMetrics
    | MetricsSnapshot
    | EncodeImages
    | ImagesReady
    | ImagesFailed
    | VisionStats
    | ReleaseImages
    | EncodeBatch
    | BatchEncoded
    | ForwardTiles
    | PreprocessImage
    | ImagePreprocessed
    | StepPlan
    | FlushStep
    | StepResult
)
