"""One validation of sampling parameters, shared by every endpoint."""

from __future__ import annotations

from vlmd.messages import SamplingParams


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
    ignore_eos: bool = False,
    seed: int | None = None,
) -> SamplingParams:
    if max_new_tokens < 1:
        raise InvalidParameter("max_new_tokens", f"must be at least 1, got {max_new_tokens}")
    if not 0.0 <= temperature <= 100.0:
        raise InvalidParameter("temperature", f"must be in [0, 100], got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise InvalidParameter("top_p", f"must be in (0, 1], got {top_p}")
    if top_k == 0 or top_k < -1:
        raise InvalidParameter("top_k", f"must be -1 (no limit) or at least 1, got {top_k}")
    if not 0.0 < repetition_penalty <= 100.0:
        raise InvalidParameter("repetition_penalty", f"must be in (0, 100], got {repetition_penalty}")
    if seed is not None and not 0 <= seed < 2**63:
        raise InvalidParameter("seed", f"must be in [0, 2**63), got {seed}")
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        ignore_eos=ignore_eos,
        seed=seed,
    )
