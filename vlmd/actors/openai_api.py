"""OpenAI-compatible routes of the http actor: /v1/chat/completions, /v1/completions, /v1/models.

A chat's prompt is the model's chat template over the messages; each image part becomes the
placeholder the template writes, expanded like any other image (clients never write `<img>`).
Each choice (`n` per prompt) is a scheduler request of its own; the choices of one OpenAI request
share one queue of updates. Stop strings are matched here, on the detokenized text: a match ends
the choice and aborts its scheduler request, which frees its pages at once.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from vlmd.actors.images import CheckedImage
from vlmd.actors.inflight import ClientError, ClientGone, Tracked, refuse_asked
from vlmd.actors.limits import Places
from vlmd.actors.tokenizer import ImageSpan
from vlmd.api import ImageInput
from vlmd.detokenizer import StopStringText
from vlmd.messages import SamplingParams, TokenOut, TopLogprobs
from vlmd.openai_types import ChatCompletionBody, ChatMessage, CompletionBody, SamplingFields, TextPart
from vlmd.sampling import (
    InvalidParameter,
    check_num_choices,
    check_stop_strings,
    choice_seed,
    make_sampling_params,
)

if TYPE_CHECKING:
    from vlmd.actors.http import HttpActor

CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
COMPLETION_DEFAULT_MAX_TOKENS = 16  # as OpenAI's legacy completions API; a chat may fill the context


@dataclass
class Choice:
    index: int
    prompt: int  # the index of its prompt (its n - 1 siblings share it)
    request_id: str
    tracked: Tracked
    text: StopStringText
    num_tokens: int = 0  # generated tokens, up to the one that completed a stop string
    finish_reason: str | None = None
    tokens: list[tuple[int, float, TopLogprobs | None]] = field(default_factory=list)  # with logprobs
    text_offset: int = 0  # characters of the token texts given in legacy logprobs so far


@dataclass
class Delta:
    """What one update from the scheduler adds to a choice."""

    choice: Choice
    text: str
    tokens: list[tuple[int, float, TopLogprobs | None]]
    finish_reason: str | None


@dataclass
class Job:
    """One OpenAI request: its choices in flight."""

    chat: bool  # /v1/chat/completions, else /v1/completions
    logprobs: bool  # the client asked for logprobs
    choices: list[Choice] = field(default_factory=list)
    updates: asyncio.Queue = field(default_factory=asyncio.Queue)  # shared by the choices' requests
    num_prompt_tokens: int = 0
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


class OpenAIApi:
    def __init__(self, actor: HttpActor) -> None:
        self.actor = actor
        self.prompts = actor.prompts
        args = actor.args
        self.model_id = args.served_model_name or os.path.basename(os.path.normpath(args.model_dir))
        self.created = int(time.time())

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]

    async def models(self, request: Request) -> Response:
        model = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "vlmd"}
        return JSONResponse({"object": "list", "data": [model]})

    async def chat_completions(self, request: Request) -> Response:
        try:
            body = await self.actor.read_body(request, ChatCompletionBody)
            self._check_request(body)
            messages, images, image_params = _chat_messages(body.messages)
            if body.top_logprobs and not body.logprobs:
                raise ClientError(400, "parameter `top_logprobs` needs `logprobs` to be true", "top_logprobs")
            max_name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
            max_tokens = (
                body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            )
            top = (body.top_logprobs or 0) if body.logprobs else 0
            sampling, stop = self._sampling(body, max_tokens, top, {"max_new_tokens": max_name})
            n = _given(body.n, 1)
            with self.actor.queue.reserve(n) as places:  # places in the queue while images are checked
                checked = await self.actor.check_images(images, image_params)
                try:
                    prompt = await self.actor.tokenize(self._build_chat, messages, checked, "messages")
                    job = Job(chat=True, logprobs=bool(body.logprobs))
                    self._start(job, [(prompt, checked)], sampling, stop, n, max_tokens, max_name, places)
                finally:
                    self.actor.release_checked(checked)  # each submitted choice holds its images itself
        except ClientError as exc:
            return error_response(exc)
        return await self._answer(job, body, request)

    async def completions(self, request: Request) -> Response:
        try:
            body = await self.actor.read_body(request, CompletionBody)
            self._check_request(body)
            texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if not texts:
                raise ClientError(400, "parameter `prompt` must not be an empty list", "prompt")
            names = {"max_new_tokens": "max_tokens", "top_logprobs": "logprobs"}
            sampling, stop = self._sampling(body, body.max_tokens, body.logprobs or 0, names)
            n = _given(body.n, 1)
            with self.actor.queue.reserve(len(texts) * n) as places:
                prompts = [
                    (await self.actor.tokenize(self.prompts.build_text, text, [], "prompt"), [])
                    for text in texts
                ]
                max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
                job = Job(chat=False, logprobs=body.logprobs is not None)
                self._start(job, prompts, sampling, stop, n, max_tokens, "max_tokens", places)
        except ClientError as exc:
            return error_response(exc)
        return await self._answer(job, body, request)

    # --- requests in ----------------------------------------------------------------------------

    def _check_request(self, body: SamplingFields) -> None:
        """The model is this server's, and the request asks for nothing it does not do."""
        if body.model is not None and body.model != self.model_id:
            raise ClientError(
                404,
                f"the model `{body.model}` does not exist; this server serves `{self.model_id}`",
                "model",
                "model_not_found",
            )
        refuse_unsupported(body)

    def _build_chat(self, messages: list[dict], tiles_per_image: list[int]):
        return self.prompts.build_chat(self.prompts.render_chat(messages), tiles_per_image)

    def _sampling(
        self, body: SamplingFields, max_tokens: int | None, top_logprobs: int, names: dict[str, str]
    ) -> tuple[SamplingParams, list[str]]:
        """Validated sampling parameters (max_new_tokens still a placeholder when not given)."""
        try:
            check_num_choices(_given(body.n, 1))
            stop = check_stop_strings(body.stop)
            sampling = make_sampling_params(  # OpenAI samples unless temperature is 0
                body,
                names=names,
                max_new_tokens=_given(max_tokens, 1),
                do_sample=True,
                top_logprobs=top_logprobs,
            )
        except InvalidParameter as exc:
            raise ClientError(400, str(exc), exc.name) from None
        return sampling, stop

    def _start(
        self,
        job: Job,
        prompts: list[tuple[tuple[list[int], list[ImageSpan]], list[CheckedImage]]],
        sampling: SamplingParams,
        stop: list[str],
        n: int,
        max_tokens: int | None,
        max_name: str,
        places: Places,
    ) -> None:
        """Submit `n` choices per prompt once every prompt fits, each in one of `places` (reserved
        for them all); `max_tokens` None: fill the context."""
        limits = []
        for (prompt_ids, _), _ in prompts:
            limit = (
                self.actor.runtime.max_req_total_len - len(prompt_ids) if max_tokens is None else max_tokens
            )
            self.actor.check_length(len(prompt_ids), limit, max_name, "messages" if job.chat else "prompt")
            limits.append(limit)
        job.num_prompt_tokens = sum(len(prompt_ids) for (prompt_ids, _), _ in prompts)
        for prompt, (((prompt_ids, spans), checked), limit) in enumerate(zip(prompts, limits, strict=True)):
            for i in range(n):
                params = msgspec.structs.replace(
                    sampling, max_new_tokens=limit, seed=choice_seed(sampling.seed, i)
                )
                request_id, tracked = self.actor.submit(
                    prompt_ids, spans, checked, params, places, updates=job.updates
                )
                text = StopStringText(self.prompts.tokenizer, stop)
                job.choices.append(Choice(len(job.choices), prompt, request_id, tracked, text))

    # --- answers out ----------------------------------------------------------------------------

    async def _answer(self, job: Job, body: SamplingFields, request: Request) -> Response:
        if body.stream:
            # The stream starts with the first token: an error before it has its own status.
            try:
                first = await self.actor.first_update(job.updates, request)
            except (ClientError, ClientGone) as exc:
                self._forget(job)
                return Response(status_code=499) if isinstance(exc, ClientGone) else error_response(exc)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = self._stream(job, include_usage, first)
            return StreamingResponse(stream, media_type="text/event-stream")
        finishing = asyncio.ensure_future(self._drain(job))
        gone = asyncio.ensure_future(self.actor.until_disconnect(request))
        try:
            await asyncio.wait([finishing, gone], return_when=asyncio.FIRST_COMPLETED)
            if not finishing.done():
                return Response(status_code=499)  # nobody reads it; the requests are aborted
            finishing.result()
        except ClientError as exc:
            return error_response(exc)
        finally:
            finishing.cancel()
            gone.cancel()
            self._forget(job)
        return JSONResponse(self._response(job))

    async def _drain(self, job: Job) -> None:
        async for _ in self._progress(job):
            pass

    async def _stream(self, job: Job, include_usage: bool, first: TokenOut) -> AsyncIterator[bytes]:
        try:
            try:
                if job.chat:
                    for choice in job.choices:
                        yield _sse(self._chunk(job, choice.index, {"role": "assistant", "content": ""}))
                async for delta in self._progress(job, first):
                    if delta.text or delta.tokens and job.logprobs or delta.finish_reason:
                        yield _sse(self._delta_chunk(job, delta, include_usage))
                if include_usage:
                    yield _sse({**self._chunk(job, None, None), "choices": [], "usage": _usage(job)})
            except ClientError as exc:
                for delta in _held_texts(job):  # no stop string ended them: they are the answer's
                    yield _sse(self._delta_chunk(job, delta, include_usage))
                yield _sse(_error_body(exc))
            yield b"data: [DONE]\n\n"
        finally:
            self._forget(job)

    async def _progress(self, job: Job, first: TokenOut | None = None) -> AsyncIterator[Delta]:
        """What each update from the scheduler (after `first`, already taken from the queue)
        adds to a choice, until every choice has finished."""
        while any(choice.finish_reason is None for choice in job.choices):
            update, first = (first, None) if first is not None else (await job.updates.get(), None)
            if isinstance(update, ClientError):
                raise update
            choice = next((c for c in job.choices if c.request_id == update.request_id), None)
            if choice is not None and choice.finish_reason is None:
                yield self._advance(choice, update)

    def _advance(self, choice: Choice, update: TokenOut) -> Delta:
        first = len(choice.tokens)
        tops = update.top_logprobs or [None] * len(update.token_ids)
        for token_id, logprob, top in zip(update.token_ids, update.logprobs, tops, strict=True):
            choice.num_tokens += 1
            choice.tokens.append((token_id, logprob, top))
            choice.text.push(token_id)
            if choice.text.stopped:
                choice.finish_reason = "stop"
                self.actor.forget(choice.request_id, choice.tracked)  # aborts what is still running
                break
        else:
            if update.finish_reason is not None:
                choice.text.finish()
                choice.finish_reason = update.finish_reason
        return Delta(choice, choice.text.release(), choice.tokens[first:], choice.finish_reason)

    def _forget(self, job: Job) -> None:
        for choice in job.choices:
            self.actor.forget(choice.request_id, choice.tracked)

    def _chunk(self, job: Job, index: int | None, delta) -> dict:
        kind = "chat.completion.chunk" if job.chat else "text_completion"
        chunk = {"id": _job_id(job), "object": kind, "created": job.created, "model": self.model_id}
        if index is not None:
            content = {"delta": delta} if job.chat else {"text": delta}
            chunk["choices"] = [{"index": index, **content, "logprobs": None, "finish_reason": None}]
        return chunk

    def _delta_chunk(self, job: Job, delta: Delta, include_usage: bool) -> dict:
        content = ({"content": delta.text} if delta.text else {}) if job.chat else delta.text
        chunk = self._chunk(job, delta.choice.index, content)
        entry = chunk["choices"][0]
        entry["finish_reason"] = delta.finish_reason
        if job.logprobs:
            entry["logprobs"] = self._logprobs(job, delta.choice, delta.tokens)
        if include_usage:
            chunk["usage"] = None
        return chunk

    def _response(self, job: Job) -> dict:
        choices = []
        for choice in job.choices:
            entry = {"index": choice.index}
            if job.chat:
                entry["message"] = {"role": "assistant", "content": choice.text.text}
            else:
                entry["text"] = choice.text.text
            entry["logprobs"] = self._logprobs(job, choice, choice.tokens) if job.logprobs else None
            entry["finish_reason"] = choice.finish_reason
            choices.append(entry)
        kind = "chat.completion" if job.chat else "text_completion"
        response = {"id": _job_id(job), "object": kind, "created": job.created, "model": self.model_id}
        return {**response, "choices": choices, "usage": _usage(job)}

    def _logprobs(
        self, job: Job, choice: Choice, tokens: list[tuple[int, float, TopLogprobs | None]]
    ) -> dict:
        """Chat: OpenAI's `content` entries; completions: the legacy parallel lists, `text_offset`
        counting on from the choice's tokens given before (a stream's earlier chunks)."""
        if job.chat:
            content = []
            for token_id, logprob, top in tokens:
                alternatives = zip(top.token_ids, top.logprobs, strict=True) if top else ()
                content.append(
                    {
                        **self._token_entry(token_id, logprob),
                        "top_logprobs": [self._token_entry(t, lp) for t, lp in alternatives],
                    }
                )
            return {"content": content, "refusal": None}
        texts = [self.prompts.token_text(t) for t, _, _ in tokens]
        offsets = list(itertools.accumulate(map(len, texts), initial=choice.text_offset))
        choice.text_offset = offsets.pop()
        return {
            "tokens": texts,
            "text_offset": offsets,
            "token_logprobs": [lp for _, lp, _ in tokens],
            "top_logprobs": [self._top_by_text(top) for _, _, top in tokens],
        }

    def _top_by_text(self, top: TopLogprobs | None) -> dict[str, float]:
        """The legacy API keys alternatives by text: where two decode alike, the likelier stays."""
        by_text: dict[str, float] = {}
        for token_id, logprob in zip(top.token_ids, top.logprobs, strict=True) if top else ():
            by_text.setdefault(self.prompts.token_text(token_id), logprob)
        return by_text

    def _token_entry(self, token_id: int, logprob: float) -> dict:
        token_bytes = self.prompts.token_bytes(token_id)
        return {"token": self.prompts.token_text(token_id), "logprob": logprob, "bytes": list(token_bytes)}


def _chat_messages(messages: list[ChatMessage]) -> tuple[list[dict], list[ImageInput], list[str]]:
    """The messages as the chat template takes them, their images in order, and where each image
    is in the body (`messages[i].content[j].image_url`)."""
    if not messages:
        raise ClientError(400, "parameter `messages` must not be empty", "messages")
    rendered, images, params = [], [], []
    for i, message in enumerate(messages):
        role = CHAT_ROLES.get(message.role)
        if role is None:
            raise ClientError(
                400, f"messages[{i}]: role {message.role!r} is not supported", f"messages[{i}].role"
            )
        if message.content is None:
            raise ClientError(400, f"messages[{i}] has no content", f"messages[{i}].content")
        content = message.content
        if not isinstance(content, str):
            content = []
            for j, part in enumerate(message.content):
                if isinstance(part, TextPart):
                    content.append({"type": "text", "text": part.text})
                else:
                    if isinstance(part.image_url, str):
                        images.append(ImageInput("url", part.image_url))
                    else:
                        limit = part.image_url.max_dynamic_patch
                        images.append(ImageInput("url", part.image_url.url, max_dynamic_patch=limit))
                    content.append({"type": "image"})
                    params.append(f"messages[{i}].content[{j}].image_url")
        rendered.append({"role": role, "content": content})
    return rendered, images, params


def _given(value, default):
    return default if value is None else value


def _job_id(job: Job) -> str:
    return ("chatcmpl-" if job.chat else "cmpl-") + job.id


def refuse_unsupported(body: SamplingFields) -> None:
    """A 400 for a parameter that asks for what vlmd does not do, where a 200 would quietly leave
    it out of the answer (tool calls, a JSON format, a bias, ...); their defaults pass."""
    if body.stream_options is not None and not body.stream:
        raise ClientError(400, "parameter `stream_options` needs `stream` to be true", "stream_options")
    asked = {
        "logit_bias": bool(body.logit_bias),
        "response_format": body.response_format not in (None, {"type": "text"}),
        "tools": bool(getattr(body, "tools", None)),
        "functions": bool(getattr(body, "functions", None)),
        "tool_choice": getattr(body, "tool_choice", None) not in (None, "none", "auto"),
        "add_generation_prompt": getattr(body, "add_generation_prompt", None) is False,
        "echo": bool(getattr(body, "echo", None)),
        "suffix": getattr(body, "suffix", None) is not None,
        "best_of": getattr(body, "best_of", None) not in (None, _given(body.n, 1)),
    }
    refuse_asked(asked)


def _usage(job: Job) -> dict:
    completion = sum(choice.num_tokens for choice in job.choices)
    total = job.num_prompt_tokens + completion
    # Each prompt counts once, as in prompt_tokens: with the fewest tokens any of its choices found
    # cached (the first to run computes what its siblings then find).
    fewest: dict[int, int] = {}
    for choice in job.choices:
        cached = choice.tracked.num_cached_tokens
        fewest[choice.prompt] = min(fewest.get(choice.prompt, cached), cached)
    cached = sum(fewest.values())
    return {
        "prompt_tokens": job.num_prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": total,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _held_texts(job: Job) -> list[Delta]:
    """The text each unfinished choice held back for a possible stop string, when the request
    fails: nothing was matched, so it is shown."""
    deltas = []
    for choice in job.choices:
        if choice.finish_reason is None:
            choice.text.finish()
            text = choice.text.release()
            if text:
                deltas.append(Delta(choice, text, [], None))
    return deltas


def _error_body(exc: ClientError) -> dict:
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    return {"error": {"message": str(exc), "type": kind, "param": exc.param, "code": exc.code}}


def error_response(exc: ClientError) -> JSONResponse:
    """An error in OpenAI's shape."""
    return JSONResponse(_error_body(exc), status_code=exc.status, headers=exc.headers)


def _sse(event: dict) -> bytes:
    return b"data: " + msgspec.json.encode(event) + b"\n\n"
