"""One validation of sampling parameters, shared by every endpoint.

Endpoints name some parameters their own way (OpenAI's `max_tokens` is LightLLM's
`max_new_tokens`); `names` maps ours to theirs so that an error names what the client sent.
"""

from __future__ import annotations

import re

import msgspec

from vlmd.messages import SamplingParams

MAX_CHOICES = 16  # `n`: each choice is a request of its own, with its own KV pages
MAX_STOP_STRINGS = 16
# Each stop string is matched as the text grows (OpenAI's, `vlmd.detokenizer`) or tokenized and
# matched after every token (LightLLM's, in the scheduler): a bound keeps both cheap.
MAX_STOP_STRING_CHARS = 1000

# SamplingParams' fields each API names or derives its own way; every other field is a knob
# both APIs take as it is, under its own name.
API_SPECIFIC = ("max_new_tokens", "do_sample", "top_logprobs")
KNOBS = tuple(f for f in msgspec.structs.fields(SamplingParams) if f.name not in API_SPECIFIC)

# The knobs as optional body fields (None: not given, the default applies), with their types
# and ranges, so that decoding a body already checks them. The API bodies subclass it.
SamplingKnobs = msgspec.defstruct(
    "SamplingKnobs", [(f.name, f.type | None, None) for f in KNOBS], kw_only=True, module=__name__
)


class InvalidParameter(ValueError):
    """A request parameter is out of range; the message names it."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"parameter `{name}` {message}")
        self.name = name


def make_sampling_params(
    knobs: msgspec.Struct, *, names: dict[str, str] | None = None, **fields
) -> SamplingParams:
    """Validated parameters from the knobs a body gave (a `SamplingKnobs`; None: the default)
    and the API's own `fields` (see API_SPECIFIC). `names` maps our names to the API's, so that
    an error names what the client sent."""
    given = {f.name: value for f in KNOBS if (value := getattr(knobs, f.name)) is not None}
    values = {**given, **fields}
    try:
        return msgspec.convert(values, SamplingParams)
    except msgspec.ValidationError as exc:
        match = re.fullmatch(r"(.*) - at `\$\.(\w+)`", str(exc))
        if match is None:
            raise
        name = match[2]
        raise InvalidParameter(
            (names or {}).get(name, name), f"{match[1].lower()}, got {values[name]!r}"
        ) from None


def check_num_choices(n: int) -> None:
    if not 1 <= n <= MAX_CHOICES:
        raise InvalidParameter("n", f"must be in [1, {MAX_CHOICES}], got {n}")


def check_stop_strings(
    stop: str | list[str] | None, name: str = "stop", allow_empty: bool = False
) -> list[str]:
    """Stop strings as a list: at most MAX_STOP_STRINGS of at most MAX_STOP_STRING_CHARS each;
    empty ones refused unless `allow_empty` (LightLLM's `stop_sequences` skips them)."""
    stops = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidParameter(name, f"takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
    if not allow_empty and not all(stops):
        raise InvalidParameter(name, "must not contain an empty string")
    longest = max(map(len, stops), default=0)
    if longest > MAX_STOP_STRING_CHARS:
        raise InvalidParameter(
            name, f"takes strings of at most {MAX_STOP_STRING_CHARS} characters, got one of {longest}"
        )
    return stops


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of a request: distinct choices, reproducible as a whole."""
    return None if seed is None else (seed + index) % 2**63
