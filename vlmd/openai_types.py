"""Request bodies of the OpenAI-compatible API, decoded and type-checked by msgspec.

Optional parameters accept JSON null as "not given", as OpenAI's API does. Fields vLLM adds to
OpenAI's (top_k, min_p, repetition_penalty, ignore_eos) are accepted too. Parameters that would change what
the answer is (tools, response_format, logit_bias, ...) are named here, so that asking for what vlmd
does not do is a 400; other unknown fields are ignored.
"""

from __future__ import annotations

import msgspec

from vlmd.sampling import SamplingKnobs


class ImageURL(msgspec.Struct):
    url: str  # http(s) URL or data:image/...;base64,... URI
    detail: str | None = None  # accepted; images are tiled as the model's processor does
    max_dynamic_patch: int | None = None  # LMDeploy's per-image tile limit, 1..--max_tiles


class TextPart(msgspec.Struct, tag="text", tag_field="type"):
    text: str


class ImagePart(msgspec.Struct, tag="image_url", tag_field="type"):
    image_url: ImageURL | str


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class SamplingFields(SamplingKnobs, kw_only=True):
    """What /v1/chat/completions and /v1/completions share: the sampling knobs
    (`vlmd.sampling.SamplingKnobs`, temperature 0 is greedy) and these."""

    model: str | None = None
    max_tokens: int | None = None  # default: the rest of the context
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    user: str | None = None
    # Not supported beyond their defaults (`openai_api.refuse_unsupported`): a request that asks
    # for more is a 400, not a 200 that quietly ignores what it asked for.
    logit_bias: dict[str, float] | None = None
    response_format: dict | None = None  # {"type": "text"} only


class ChatCompletionBody(SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None  # alternatives per token; needs logprobs
    tools: list | None = None  # none: no tool calls are parsed
    tool_choice: str | dict | None = None  # "none" only
    functions: list | None = None  # the deprecated form of tools
    add_generation_prompt: bool | None = None  # vLLM's: true only


class CompletionBody(SamplingFields, kw_only=True):
    prompt: str | list[str]
    logprobs: int | None = None  # alternatives per token (the legacy API's logprobs)
    echo: bool | None = None  # not supported: must be false
    suffix: str | None = None  # not supported: must be absent
    best_of: int | None = None  # not supported beyond n
