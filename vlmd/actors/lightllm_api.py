"""LightLLM's API: POST /generate (JSON) and POST /generate_stream (server-sent events, one per
token), with LightLLM's request and response formats and its `{"error": ...}` errors."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from vlmd.actors.images import BadImage, check_tile_limit
from vlmd.actors.inflight import ClientError, ClientGone, Tracked, refuse_asked
from vlmd.api import GenerateBody, GenerateParameters, ImageInput
from vlmd.detokenizer import IncrementalDetokenizer, Matcher
from vlmd.messages import SamplingParams, TokenOut
from vlmd.sampling import InvalidParameter, check_stop_strings, make_sampling_params

if TYPE_CHECKING:
    from vlmd.actors.http import HttpActor


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def client_error_response(exc: ClientError) -> JSONResponse:
    """LightLLM's errors are one string: the field at fault goes in it when it is not named yet."""
    message = str(exc)
    if exc.param is not None and exc.param not in message:
        message = f"{message} (parameter `{exc.param}`)"
    return error_response(exc.status, message, exc.headers)


class LightLLMApi:
    def __init__(self, actor: HttpActor) -> None:
        self.actor = actor
        self.prompts = actor.prompts

    def routes(self) -> list[Route]:
        return [
            Route("/generate", self.generate, methods=["POST"]),
            Route("/generate_stream", self.generate_stream, methods=["POST"]),
        ]

    async def generate(self, request: Request) -> Response:
        try:
            body = await self.actor.read_body(request, GenerateBody)
            return JSONResponse(await self._generate(body, request))
        except ClientError as exc:
            return client_error_response(exc)

    async def _submit(self, body: GenerateBody) -> tuple[str, Tracked, list[list[int]]]:
        """The request handed to the scheduler: its id, its Tracked, its stop token sequences."""
        arrival = time.perf_counter()
        params = body.parameters
        sampling = self._sampling(body)
        try:
            stops = check_stop_strings(params.stop_sequences, "stop_sequences", allow_empty=True)
        except InvalidParameter as exc:
            raise ClientError(400, str(exc), exc.name) from None
        with self.actor.queue.reserve(1) as places:  # a place in the queue while its images are checked
            checked = await self.actor.check_images(self._images(body))
            try:
                prompt_ids, spans = await self.actor.tokenize(
                    self.prompts.build, body.inputs, checked, "inputs"
                )
                self.actor.check_length(len(prompt_ids), sampling.max_new_tokens)
                # Off the event loop, as the prompt: long stop strings take as long to tokenize.
                stop_token_seqs = await asyncio.to_thread(self.prompts.stop_token_seqs, stops)
                request_id, tracked = self.actor.submit(
                    prompt_ids, spans, checked, sampling, places, stop_token_seqs, arrival=arrival
                )
                return request_id, tracked, stop_token_seqs
            finally:
                self.actor.release_checked(checked)  # the submitted request holds its images itself

    async def _generate(self, body: GenerateBody, request: Request) -> dict:
        request_id, tracked, _ = await self._submit(body)
        gone = asyncio.ensure_future(self.actor.until_disconnect(request))
        try:
            await asyncio.wait([tracked.done, gone], return_when=asyncio.FIRST_COMPLETED)
            if not tracked.done.done():
                raise ClientGone()
            finish_reason, num_stop = tracked.done.result()
        finally:
            gone.cancel()
            self.actor.forget(request_id, tracked)
        shown = tracked.token_ids[: len(tracked.token_ids) - num_stop]
        response = {
            "generated_text": [self.prompts.decode(shown)],
            "count_output_tokens": len(tracked.token_ids),
            "finish_reason": finish_reason,
            "prompt_tokens": tracked.num_prompt_tokens,
        }
        if body.parameters.return_details:
            response["tokens"] = [
                {"id": t, "text": self.prompts.token_text(t), "logprob": lp}
                for t, lp in zip(tracked.token_ids, tracked.logprobs, strict=True)
            ]
        return response

    async def generate_stream(self, request: Request) -> Response:
        """Server-sent events, one per token, as LightLLM emits them; the last carries the text.
        The response starts with the first token: an error before it has its own status."""
        try:
            body = await self.actor.read_body(request, GenerateBody)
            request_id, tracked, stops = await self._submit(body)
        except ClientError as exc:
            return client_error_response(exc)
        try:
            first = await self.actor.first_update(tracked.updates, request)
        except (ClientError, ClientGone) as exc:
            self.actor.forget(request_id, tracked)
            if isinstance(exc, ClientGone):
                return Response(status_code=499)  # nobody reads it; the request was aborted
            return client_error_response(exc)
        events = self._events(request_id, tracked, first, stops, body.parameters.return_details)
        return StreamingResponse(events, media_type="text/event-stream")

    async def _events(
        self, request_id: str, tracked: Tracked, first: TokenOut, stops: list[list[int]], details: bool
    ):
        """A token's event goes out once no stop sequence can begin at it (those of a matched stop
        sequence never do: its text is not shown, the last one's event says the request ended);
        should the request fail first, the events held go out before the error's. As LightLLM's,
        the last event carries the text and, with `return_details`, its details."""
        detok = IncrementalDetokenizer(self.prompts.tokenizer)
        special = set(self.prompts.tokenizer.all_special_ids)
        matchers = [Matcher(seq) for seq in stops]
        held: list[bytes] = []  # events of the tokens that may begin a stop sequence
        count = 0
        update = first
        try:
            while True:
                if isinstance(update, ClientError):  # no stop sequence ended the tokens held
                    for sent in held:
                        yield sent
                    yield _sse({"error": str(update), "finished": True, "finish_reason": None})
                    return
                for token_id, logprob in zip(update.token_ids, update.logprobs, strict=True):
                    count += 1
                    text = detok.push(token_id)
                    final = update.finish_reason is not None and count == len(tracked.token_ids)
                    if final:
                        # The text of a matched stop sequence is not shown (its last token here).
                        text = "" if update.num_stop_tokens else text + detok.flush()
                    event = {
                        "token": {
                            "id": token_id,
                            "text": text,
                            "logprob": logprob,
                            "special": token_id in special,
                            "count_output_tokens": count,
                            "prompt_tokens": tracked.num_prompt_tokens,
                        },
                        "generated_text": None,
                        "finished": final,
                        "finish_reason": update.finish_reason if final else None,
                        "details": None,
                    }
                    if not final:
                        for matcher in matchers:
                            matcher.first_end((token_id,))
                        held.append(_sse(event))
                        keep = max((matcher.matched for matcher in matchers), default=0)
                        for sent in held[: len(held) - keep]:
                            yield sent
                        del held[: len(held) - keep]
                        continue
                    shown = tracked.token_ids[: len(tracked.token_ids) - update.num_stop_tokens]
                    event["generated_text"] = self.prompts.decode(shown)
                    if details:
                        event["details"] = {"generated_tokens": count, "finish_reason": update.finish_reason}
                    for sent in held[: len(held) - max(update.num_stop_tokens - 1, 0)]:
                        yield sent
                    yield _sse(event)
                if update.finish_reason is not None:
                    return
                update = await tracked.updates.get()
        finally:
            self.actor.forget(request_id, tracked)

    def _images(self, body: GenerateBody) -> list[ImageInput]:
        """The request's images, each with its tile limit: its own, else `image_max_patch_num`."""
        limit = body.parameters.image_max_patch_num
        images = body.multimodal_params.images
        if limit <= 0:  # LightLLM's "not given"
            return images
        try:
            check_tile_limit(limit, self.actor.images.tiling.max_tiles, "image_max_patch_num")
        except BadImage as exc:
            raise ClientError(400, str(exc), exc.param) from None
        return [
            image
            if image.max_dynamic_patch is not None
            else msgspec.structs.replace(image, max_dynamic_patch=limit)
            for image in images
        ]

    def _sampling(self, body: GenerateBody) -> SamplingParams:
        p = body.parameters
        refuse_unsupported(p)
        try:
            return make_sampling_params(p, max_new_tokens=p.max_new_tokens, do_sample=p.do_sample)
        except InvalidParameter as exc:
            raise ClientError(400, str(exc), exc.name) from None


def refuse_unsupported(params: GenerateParameters) -> None:
    """A 400 for a LightLLM parameter that asks for what vlmd does not do (several answers, a
    minimum length, constrained decoding); their defaults pass."""
    asked = {
        "n": params.n not in (None, 1),
        "best_of": params.best_of not in (None, 1),
        "min_new_tokens": params.min_new_tokens is not None and params.min_new_tokens > 1,
        "regular_constraint": params.regular_constraint is not None,
        "guided_grammar": params.guided_grammar is not None,
        "guided_json": params.guided_json is not None,
        "allowed_token_ids": params.allowed_token_ids is not None,
    }
    refuse_asked(asked)


def _sse(event: dict) -> bytes:
    return b"data:" + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"
