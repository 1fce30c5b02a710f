"""HTTP request bodies, decoded and type-checked by msgspec (so errors name the bad field)."""

from __future__ import annotations

import msgspec

from vlmd.sampling import SamplingKnobs


class GenerateParameters(SamplingKnobs, kw_only=True):
    """LightLLM's `parameters`: the sampling knobs (`vlmd.sampling.SamplingKnobs`) and these."""

    max_new_tokens: int = 16
    stop_sequences: list[str] | str = []
    do_sample: bool = False
    return_details: bool = False  # add per-token ids and logprobs to the response
    image_max_patch_num: int = -1  # LightLLM's: > 0 is the tile limit of images that set none
    # LightLLM's, not supported beyond their defaults: asking for more is a 400
    # (`lightllm_api.refuse_unsupported`), not an answer that quietly leaves it out.
    n: int | None = None  # 1 only
    best_of: int | None = None  # 1 only
    min_new_tokens: int | None = None  # 1 at most: the first token may be the end
    regular_constraint: str | None = None
    guided_grammar: str | None = None
    guided_json: str | dict | None = None
    allowed_token_ids: list[int] | None = None


class ImageInput(msgspec.Struct):
    type: str  # "url" | "base64"
    data: str
    resize_to_fit: bool = False  # beyond --max_image_pixels: downscale it instead of refusing
    max_dynamic_patch: int | None = None  # tile limit, 1..--max_tiles; None: the request's or server's


class MultimodalParams(msgspec.Struct, kw_only=True):
    images: list[ImageInput] = []


class GenerateBody(msgspec.Struct, kw_only=True):
    """The body of POST /generate, as LightLLM's clients send it."""

    inputs: str
    parameters: GenerateParameters = msgspec.field(default_factory=GenerateParameters)
    multimodal_params: MultimodalParams = msgspec.field(default_factory=MultimodalParams)
