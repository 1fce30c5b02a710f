"""One validation of sampling parameters, shared by every endpoint.

Endpoints name some parameters their own way (OpenAI's `max_tokens` is LightLLM's
`max_new_tokens`); `names` maps ours to theirs so that an error names what the client sent.
"""

from __future__ import annotations

from vlmd.messages import SamplingParams

MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 16  # `n`: each choice is a request of its own, with its own KV pages
MAX_STOP_STRINGS = 16


class InvalidParameter(ValueError):
    """A request parameter is out of range; the message names it."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"parameter `{name}` {message}")
        self.name = name


def make_sampling_params(
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = -1,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    top_logprobs: int = 0,
    ignore_eos: bool = False,
    seed: int | None = None,
    names: dict[str, str] | None = None,
) -> SamplingParams:
    def fail(name: str, message: str) -> InvalidParameter:
        return InvalidParameter((names or {}).get(name, name), message)

    if max_new_tokens < 1:
        raise fail("max_new_tokens", f"must be at least 1, got {max_new_tokens}")
    if not 0.0 <= temperature <= 100.0:
        raise fail("temperature", f"must be in [0, 100], got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise fail("top_p", f"must be in (0, 1], got {top_p}")
    if top_k == 0 or top_k < -1:
        raise fail("top_k", f"must be -1 (no limit) or at least 1, got {top_k}")
    if not 0.0 < repetition_penalty <= 100.0:
        raise fail("repetition_penalty", f"must be in (0, 100], got {repetition_penalty}")
    if not -2.0 <= presence_penalty <= 2.0:
        raise fail("presence_penalty", f"must be in [-2, 2], got {presence_penalty}")
    if not -2.0 <= frequency_penalty <= 2.0:
        raise fail("frequency_penalty", f"must be in [-2, 2], got {frequency_penalty}")
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise fail("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}")
    if seed is not None and not 0 <= seed < 2**63:
        raise fail("seed", f"must be in [0, 2**63), got {seed}")
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        ignore_eos=ignore_eos,
        seed=seed,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        top_logprobs=top_logprobs,
    )


def check_num_choices(n: int) -> None:
    if not 1 <= n <= MAX_CHOICES:
        raise InvalidParameter("n", f"must be in [1, {MAX_CHOICES}], got {n}")


def check_stop_strings(stop: str | list[str] | None) -> list[str]:
    """Text-level stop strings: the output ends before the first one it contains."""
    stops = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidParameter("stop", f"takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
    if not all(stops):
        raise InvalidParameter("stop", "must not contain an empty string")
    return stops


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of a request: distinct choices, reproducible as a whole."""
    return None if seed is None else (seed + index) % 2**63
