"""How a benchmark request is sent and its stream read, per backend.

- `vlmd`: POST /generate_stream with LightLLM's body; each server-sent event `data:{...}` carries
  one token (`token.count_output_tokens`, `token.prompt_tokens`), the last has `finished: true`.
- `openai-chat`: POST /v1/chat/completions with `stream: true` and
  `stream_options.include_usage`; images as `image_url` data URIs; chunks `data: {...}` whose
  `choices[0].delta.content` carries text, a last chunk with `usage`, then `data: [DONE]`.

The line parsers are pure functions, tested on recorded streams; `send` does the I/O and timing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from vlmd.benchmark.args import BACKEND_NAMES
from vlmd.benchmark.dataset import BenchRequest


@dataclass(frozen=True)
class StreamEvent:
    """What one line of a response stream says."""

    num_chunks: int = 0  # 1 when the line carries generated text (a token arrival), else 0
    done: bool = False  # the stream is over
    error: str | None = None
    prompt_tokens: int | None = None  # as the server counts them (image tokens included)
    output_tokens: int | None = None  # generated so far (vlmd) or in total (usage)
    text: str = ""  # the generated text the line adds
    full_text: str | None = None  # the whole generated text, where the line gives it (vlmd's last)


@dataclass
class RequestResult:
    """One request's outcome; times in seconds from when it was sent."""

    expected_prompt_tokens: int  # what the dataset asked for, used when the server does not say
    requested_output_tokens: int
    ok: bool = False
    error: str = ""
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)  # gaps between token arrivals after the first
    e2e: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int = 0
    num_chunks: int = 0
    text: str = ""  # what was generated (the next turn of a conversation sends it back)
    turn: int = 1  # which turn of its conversation
    sent_at: float = 0.0  # wall-clock time it was sent (time.time()), to find a gap in server logs

    def add(self, event: StreamEvent, elapsed: float, last_arrival: float | None) -> None:
        self.text = event.full_text if event.full_text is not None else self.text + event.text
        if event.num_chunks:
            if self.ttft is None:
                self.ttft = elapsed
            else:
                self.itls.append(elapsed - last_arrival)
            self.num_chunks += event.num_chunks
        if event.prompt_tokens is not None:
            self.prompt_tokens = event.prompt_tokens
        if event.output_tokens is not None:
            self.output_tokens = event.output_tokens
        if event.error is not None:
            self.error = event.error
        if event.done:
            self.e2e = elapsed
            self.output_tokens = self.output_tokens or self.num_chunks
            self.ok = not self.error and self.num_chunks > 0
            if not self.ok and not self.error:
                self.error = "the stream ended without any generated text"


# --- vlmd ------------------------------------------------------------------------------------


def vlmd_body(request: BenchRequest, model: str | None, ignore_eos: bool, sampling: dict) -> dict:
    """sampling: knobs to send (`sampling_knobs`); none is greedy."""
    placeholders = "<img></img>\n" * len(request.images)
    chat = f"<|im_start|>user\n{placeholders}{request.prompt}<|im_end|>\n"
    for answer, user in zip(request.answers, request.turns, strict=True):
        chat += f"<|im_start|>assistant\n{answer}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
    return {
        "inputs": chat + "<|im_start|>assistant\n",
        "parameters": {
            "max_new_tokens": request.output_len,
            "ignore_eos": ignore_eos,
            "do_sample": bool(sampling),
            **sampling,
        },
        "multimodal_params": {
            "images": [{"type": "base64", "data": image.base64()} for image in request.images]
        },
    }


def parse_vlmd_line(line: str) -> StreamEvent | None:
    data = _sse_data(line)
    if data is None:
        return None
    event = json.loads(data)
    if "error" in event:
        return StreamEvent(done=True, error=str(event["error"]))
    token = event.get("token") or {}
    return StreamEvent(
        num_chunks=1 if token else 0,
        done=bool(event.get("finished")),
        prompt_tokens=token.get("prompt_tokens"),
        output_tokens=token.get("count_output_tokens"),
        text="" if token.get("special") else token.get("text") or "",
        full_text=event.get("generated_text") if event.get("finished") else None,
    )


# --- openai-chat -----------------------------------------------------------------------------


def openai_chat_body(request: BenchRequest, model: str | None, ignore_eos: bool, sampling: dict) -> dict:
    """sampling: knobs to send (`sampling_knobs`); none is greedy (temperature 0)."""
    content: list[dict] = [
        {
            "type": "image_url",
            "image_url": {"url": f"data:image/{request.image_format};base64,{image.base64()}"},
        }
        for image in request.images
    ]
    content.append({"type": "text", "text": request.prompt})
    messages = [{"role": "user", "content": content}]
    for answer, user in zip(request.answers, request.turns, strict=True):
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": user}]
    body = {
        "messages": messages,
        "max_tokens": request.output_len,
        "temperature": 1.0 if sampling else 0.0,  # OpenAI's default samples
        **sampling,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": ignore_eos,  # vLLM's and SGLang's extension; the others ignore it
    }
    if model is not None:
        body["model"] = model
    return body


def parse_openai_chat_line(line: str) -> StreamEvent | None:
    data = _sse_data(line)
    if data is None:
        return None
    if data.strip() == "[DONE]":
        return StreamEvent(done=True)
    chunk = json.loads(data)
    if "error" in chunk or chunk.get("object") == "error":
        error = chunk.get("error", chunk)
        return StreamEvent(
            done=True, error=str(error.get("message", error) if isinstance(error, dict) else error)
        )
    text = "".join((choice.get("delta") or {}).get("content") or "" for choice in chunk.get("choices") or [])
    usage = chunk.get("usage") or {}
    return StreamEvent(
        num_chunks=1 if text else 0,
        prompt_tokens=usage.get("prompt_tokens"),
        output_tokens=usage.get("completion_tokens"),
        text=text,
    )


# --- both ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    name: str
    endpoint: str  # default path
    body: Callable[[BenchRequest, str | None, bool, dict], dict]
    parse_line: Callable[[str], StreamEvent | None]


BACKENDS = {
    "vlmd": Backend("vlmd", "/generate_stream", vlmd_body, parse_vlmd_line),
    "openai-chat": Backend("openai-chat", "/v1/chat/completions", openai_chat_body, parse_openai_chat_line),
}
assert tuple(sorted(BACKENDS)) == BACKEND_NAMES, "the flag's choices and the backends disagree"


def _sse_data(line: str) -> str | None:
    """The payload of a `data:` line (LightLLM writes no space after the colon, OpenAI one)."""
    if not line.startswith("data:"):
        return None  # blank separators, comments, `event:` lines
    return line[5:].strip()


async def send(
    client: httpx.AsyncClient,
    url: str,
    backend: Backend,
    payload: bytes,
    result: RequestResult,
    disconnect_after: int | None = None,
) -> RequestResult:
    """POST one pre-encoded request and time its stream into `result`; with `disconnect_after`,
    hang up once that many tokens came (a success: the client has what it wanted)."""
    started = time.perf_counter()
    result.sent_at = time.time()
    last_arrival = None
    try:
        async with client.stream(
            "POST", url, content=payload, headers={"Content-Type": "application/json"}
        ) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:300]}"
                return result
            async for line in response.aiter_lines():
                event = backend.parse_line(line)
                if event is None:
                    continue
                now = time.perf_counter() - started
                result.add(event, now, last_arrival)
                if event.num_chunks:
                    last_arrival = now
                if disconnect_after is not None and result.num_chunks >= disconnect_after and not event.done:
                    result.add(StreamEvent(done=True), now, last_arrival)
                    return result  # leaving the block closes the connection: the server aborts
                if event.done:
                    return result
        result.error = "the server closed the stream before its end"
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    except (json.JSONDecodeError, AttributeError) as exc:
        result.error = f"unreadable stream: {exc}"
    result.ok = False
    return result
