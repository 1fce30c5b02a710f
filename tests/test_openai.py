"""The OpenAI-compatible API through the `openai` package, against /generate on the same server."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from http.server import ThreadingHTTPServer

import openai
import pytest
import requests
from transformers import AutoTokenizer

from tests.conftest import make_image
from tests.test_http import PNG, _ImageHost, b64, generate, metrics
from tests.test_stream import assert_aborted_and_serving

IMAGE = make_image(640, 480, seed=31)
MODEL = "demo"  # the basename of the demo model's directory
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def client(mm_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=mm_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def image_host():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHost)  # serves PNG at /image.png
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def data_uri(image: bytes) -> str:
    return "data:image/png;base64," + b64(image)


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def lightllm(server, turns: str, images: list[bytes], max_new_tokens: int) -> dict:
    """/generate's greedy answer, with details, to a LightLLM prompt of these turns (`<img></img>`
    where each image is), ready for the assistant's turn."""
    body = {
        "inputs": turns + "<|im_start|>assistant\n",
        "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos": True, "return_details": True},
        "multimodal_params": {"images": [{"type": "base64", "data": b64(image)} for image in images]},
    }
    response = generate(server, body)
    assert response.status_code == 200, response.text
    return response.json()


def assert_same_generation(choice, details: dict) -> None:
    """Same text, same tokens (as the logprobs name them) and the same logprob for each, up to
    float32 rounding: the second of two requests with one prompt finds it in the prefix cache and
    computes only its last token, the same arithmetic split another way."""
    assert choice.message.content == details["generated_text"][0]
    content = choice.logprobs.content
    assert [entry.token for entry in content] == [t["text"] for t in details["tokens"]]
    assert [entry.logprob for entry in content] == pytest.approx(
        [t["logprob"] for t in details["tokens"]], abs=1e-4
    )


# --- chat completions equal /generate -------------------------------------------------------------


def test_greedy_chat_with_a_data_uri_image_equals_generate(client, mm_server):
    messages = [
        {"role": "user", "content": [image_part(data_uri(IMAGE)), {"type": "text", "text": "What is this?"}]}
    ]
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, logprobs=True, **GREEDY
    )
    details = lightllm(mm_server, "<|im_start|>user\n<img></img>\nWhat is this?<|im_end|>\n", [IMAGE], 24)
    choice = chat.choices[0]
    assert_same_generation(choice, details)
    assert choice.finish_reason == "length" and chat.model == MODEL and chat.object == "chat.completion"
    assert chat.usage.prompt_tokens == details["prompt_tokens"] > 256  # the image's tokens count
    assert chat.usage.completion_tokens == 24 and chat.usage.total_tokens == details["prompt_tokens"] + 24


def test_greedy_chat_with_an_image_url_equals_generate(client, mm_server, image_host):
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Look: "}, image_part(image_host + "/image.png")],
        }
    ]
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, logprobs=True, **GREEDY
    )
    details = lightllm(mm_server, "<|im_start|>user\nLook: <img></img>\n<|im_end|>\n", [PNG], 16)
    assert_same_generation(chat.choices[0], details)


def test_several_images_across_turns_go_where_they_appear(client, mm_server):
    second, third = make_image(300, 900, seed=32), make_image(448, 448, seed=33)
    messages = [
        {"role": "system", "content": "You describe pictures."},
        {
            "role": "user",
            "content": [
                image_part(data_uri(IMAGE)),
                image_part(data_uri(second)),
                {"type": "text", "text": "Two?"},
            ],
        },
        {"role": "assistant", "content": "Two cats."},
        {"role": "user", "content": [{"type": "text", "text": "And "}, image_part(data_uri(third))]},
    ]
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, logprobs=True, **GREEDY
    )
    turns = (
        "<|im_start|>system\nYou describe pictures.<|im_end|>\n"
        "<|im_start|>user\n<img></img>\n<img></img>\nTwo?<|im_end|>\n"
        "<|im_start|>assistant\nTwo cats.<|im_end|>\n"
        "<|im_start|>user\nAnd <img></img>\n<|im_end|>\n"
    )
    details = lightllm(mm_server, turns, [IMAGE, second, third], 12)
    assert_same_generation(chat.choices[0], details)
    assert chat.usage.prompt_tokens == details["prompt_tokens"]


def test_completions_greedy_equals_generate(client, mm_server):
    prompt = "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"
    completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, logprobs=3, **GREEDY)
    details = lightllm(mm_server, "<|im_start|>user\nhello there<|im_end|>\n", [], 20)
    choice = completion.choices[0]
    assert choice.text == details["generated_text"][0] and choice.finish_reason == "length"
    assert choice.logprobs.tokens == [t["text"] for t in details["tokens"]]
    assert choice.logprobs.token_logprobs == [t["logprob"] for t in details["tokens"]]
    assert all(
        len(top) <= 3 and top[tok] == lp
        for top, tok, lp in zip(
            choice.logprobs.top_logprobs, choice.logprobs.tokens, choice.logprobs.token_logprobs, strict=True
        )
    )
    assert (
        completion.usage.prompt_tokens == details["prompt_tokens"]
        and completion.usage.completion_tokens == 20
    )


def test_completion_logprobs_give_each_token_s_text_offset_streamed_or_not(client):
    """As vLLM: where each token's text begins, counted from the completion's start."""
    kw = {"model": MODEL, "prompt": "hello there", "max_tokens": 12, "logprobs": 1, **GREEDY}
    whole = client.completions.create(**kw).choices[0].logprobs
    starts = [sum(map(len, whole.tokens[:i])) for i in range(len(whole.tokens))]
    assert whole.text_offset == starts and len(starts) == 12
    chunks = [c.choices[0].logprobs for c in client.completions.create(**kw, stream=True) if c.choices]
    assert [o for c in chunks if c for o in c.text_offset] == starts


def test_a_completion_prompt_is_text_even_where_it_says_image(client, model_dir):
    """/v1/completions takes no images: `<image>` is text there; the image tokens are refused."""
    prompt = "HTML has no <image> tag; use"
    done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    assert done.usage.prompt_tokens == len(AutoTokenizer.from_pretrained(model_dir).encode(prompt))
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="see <IMG_CONTEXT>", max_tokens=1)
    assert caught.value.body["param"] == "prompt" and "image tokens" in caught.value.body["message"]


def test_completions_default_to_16_tokens(client):
    completion = client.completions.create(model=MODEL, prompt="hello", **GREEDY)
    assert completion.usage.completion_tokens == 16 and completion.choices[0].finish_reason == "length"


# --- streaming ------------------------------------------------------------------------------------


async def stream_chat(url: str, **kw) -> list:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as aclient:
        stream = await aclient.chat.completions.create(model=MODEL, stream=True, **kw)
        return [chunk async for chunk in stream]


def test_streamed_chat_equals_the_whole_answer_and_ends_with_usage(client, mm_server):
    kw = {
        "messages": [
            {"role": "user", "content": [image_part(data_uri(IMAGE)), {"type": "text", "text": "Hi"}]}
        ],
        "max_tokens": 30,
        **GREEDY,
    }
    whole = client.chat.completions.create(model=MODEL, **kw)
    chunks = asyncio.run(stream_chat(mm_server.url, stream_options={"include_usage": True}, **kw))
    *content_chunks, usage_chunk = chunks
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in content_chunks) == whole.choices[0].message.content
    )
    assert [c.choices[0].finish_reason for c in content_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage
    assert all(c.usage is None for c in content_chunks) and len({c.id for c in chunks}) == 1
    # Without include_usage there is no usage chunk.
    plain = asyncio.run(stream_chat(mm_server.url, **kw))
    assert len(plain) == len(content_chunks) and all(c.choices for c in plain)


def test_streamed_completions_equal_the_whole_answer(client):
    kw = {"model": MODEL, "prompt": "the image shows", "max_tokens": 25, **GREEDY}
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_raw_stream_is_server_sent_events_ending_with_done(mm_server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with requests.post(
        mm_server.url + "/v1/chat/completions", json=body, stream=True, timeout=60
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith(b"data: ") for line in lines) and lines[-1] == b"data: [DONE]"
    assert [json.loads(line[6:])["object"] for line in lines[:-1]] == ["chat.completion.chunk"] * (
        len(lines) - 1
    )


# --- sampling parameters --------------------------------------------------------------------------


def test_n_choices_with_a_seed_are_distinct_and_reproducible(client):
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "n": 2}
    kw |= {"temperature": 1.0, "extra_body": {"ignore_eos": True}}
    first = client.chat.completions.create(seed=5, **kw)
    again = client.chat.completions.create(seed=5, **kw)
    other = client.chat.completions.create(seed=6, **kw)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1] and len(set(texts)) == 2
    assert [c.message.content for c in again.choices] == texts
    assert [c.message.content for c in other.choices] != texts
    assert first.usage.completion_tokens == 32 and first.usage.prompt_tokens == again.usage.prompt_tokens


def test_n_choices_stream_each_choice(mm_server, client):
    kw = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 10,
        "n": 2,
        "seed": 1,
        "temperature": 1.0,
    }
    whole = client.chat.completions.create(model=MODEL, **kw)
    chunks = asyncio.run(stream_chat(mm_server.url, **kw))
    for choice in whole.choices:
        pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == choice.index]
        assert "".join(pieces) == choice.message.content


def stop_case(tokenizer, details: dict) -> tuple[str, int]:
    """A stop string made of the end of one generated token and the start of the next, and how
    many tokens it takes for the output to contain it."""
    ids, texts = [t["id"] for t in details["tokens"]], [t["text"] for t in details["tokens"]]
    whole = details["generated_text"][0]
    for k in range(2, len(texts) - 1):
        stop = texts[k][-1:] + texts[k + 1][:1]
        if len(stop) == 2 and stop.strip() == stop and "\ufffd" not in stop:
            needed = next(m for m in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:m]))
            if whole.index(stop) > 0:
                return stop, needed
    raise AssertionError("no token boundary to stop at")


def test_stop_string_truncates_and_ends_the_request(client, mm_server, model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    details = lightllm(mm_server, "<|im_start|>user\ntell me<|im_end|>\n", [], 40)
    stop, needed = stop_case(tokenizer, details)
    whole = details["generated_text"][0]
    kw = {"messages": [{"role": "user", "content": "tell me"}], "stop": ["never there", stop], **GREEDY}
    chat = client.chat.completions.create(model=MODEL, max_tokens=3000, **kw)
    assert chat.choices[0].message.content == whole[: whole.index(stop)]
    assert chat.choices[0].finish_reason == "stop" and chat.usage.completion_tokens == needed
    # The request was aborted at the stop, not left to run its 3000 tokens.
    values = metrics(mm_server)
    deadline = time.monotonic() + 2
    while values["vlmd_requests_running"] and time.monotonic() < deadline:
        time.sleep(0.05)
        values = metrics(mm_server)
    assert values["vlmd_requests_running"] == 0 and values["vlmd_kv_pages_used"] == 0
    chunks = asyncio.run(stream_chat(mm_server.url, max_tokens=3000, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole[: whole.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    # A single string works too, and on /v1/completions.
    prompt = "<|im_start|>user\ntell me<|im_end|>\n<|im_start|>assistant\n"
    completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, stop=stop, **GREEDY)
    assert completion.choices[0].text == whole[: whole.index(stop)]


def test_logprobs_and_top_logprobs(client, mm_server):
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **GREEDY}
    chat = client.chat.completions.create(logprobs=True, top_logprobs=4, **kw)
    details = lightllm(mm_server, "<|im_start|>user\nhi<|im_end|>\n", [], 8)
    content = chat.choices[0].logprobs.content
    assert len(content) == 8
    for entry, token in zip(content, details["tokens"], strict=True):
        assert entry.logprob == token["logprob"] and entry.token == token["text"]
        assert len(entry.top_logprobs) == 4
        # Greedy: the chosen token is the best alternative; alternatives are best first.
        assert (entry.top_logprobs[0].token, entry.top_logprobs[0].logprob) == (entry.token, entry.logprob)
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
        assert all(t.bytes == list(t.token.encode()) for t in entry.top_logprobs if "\ufffd" not in t.token)
    assert (
        b"".join(bytes(entry.bytes) for entry in content).decode(errors="replace")
        == chat.choices[0].message.content
    )
    assert (
        client.chat.completions.create(logprobs=True, **kw).choices[0].logprobs.content[0].top_logprobs == []
    )
    assert client.chat.completions.create(**kw).choices[0].logprobs is None


def test_penalties_change_greedy_output_deterministically(client):
    kw = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "a"}],
        "max_tokens": 40,
        "logprobs": True,
        **GREEDY,
    }
    plain = client.chat.completions.create(**kw).choices[0]
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalized = client.chat.completions.create(**penalty, **kw).choices[0]
        again = client.chat.completions.create(**penalty, **kw).choices[0]
        assert penalized.message.content == again.message.content
        assert penalized.message.content != plain.message.content
        # Nothing was generated before the first token: it cannot be penalized.
        assert penalized.logprobs.content[0].token == plain.logprobs.content[0].token
    tokens = [entry.token for entry in plain.logprobs.content]
    assert len(set(tokens)) < len(tokens), "the unpenalized answer repeats a token"


def test_generate_takes_the_penalties_too(mm_server, client):
    kw = {
        "model": MODEL,
        "prompt": "a",
        "max_tokens": 30,
        "frequency_penalty": 1.5,
        "presence_penalty": 0.5,
        **GREEDY,
    }
    completion = client.completions.create(**kw)
    params = {"max_new_tokens": 30, "ignore_eos": True, "frequency_penalty": 1.5, "presence_penalty": 0.5}
    assert generate(mm_server, {"inputs": "a", "parameters": params}).json()["generated_text"] == [
        completion.choices[0].text
    ]


# --- errors ---------------------------------------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
IMAGE_0 = "messages[0].content[0].image_url"
TEXT = {"type": "text", "text": "see"}
BAD_CHAT_PARAMS = [
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": 101}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**7}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"presence_penalty": -2.5}, "presence_penalty"),
    ({"frequency_penalty": 2.01}, "frequency_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
    ({"seed": -1}, "seed"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop": [str(i) for i in range(17)]}, "stop"),
    ({"stop": "x" * 1001}, "stop"),  # each is matched as the text grows: bounded
    ({"extra_body": {"top_k": -2}}, "top_k"),
    ({"extra_body": {"top_k": 10**20}}, "top_k"),  # was a 500: beyond msgpack's 64-bit ints
    ({"extra_body": {"min_p": 1.5}}, "min_p"),
    ({"extra_body": {"min_p": -0.1}}, "min_p"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"extra_body": {"temperature": "hot"}}, "temperature"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "see <IMG_CONTEXT>"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [image_part("data:image/png;base64,!!")]}]}, IMAGE_0),
    ({"messages": [{"role": "user", "content": [image_part("file:///etc/passwd")]}]}, IMAGE_0),
    (
        {"messages": [{"role": "user", "content": [TEXT, TEXT, image_part("data:image/png;base64,AAAA")]}]},
        "messages[0].content[2].image_url",
    ),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    # Asked for, and not done: a 200 would quietly leave it out of the answer.
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [TOOL]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"extra_body": {"functions": [TOOL["function"]]}}, "functions"),
    ({"logit_bias": {"100": 100}}, "logit_bias"),
    ({"extra_body": {"add_generation_prompt": False}}, "add_generation_prompt"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
]


def test_the_defaults_of_unsupported_parameters_pass(client):
    """What clients send by default: a text response format, no tools, no bias, one of one."""
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    defaults = {"response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "logit_bias": {}}
    assert client.chat.completions.create(**kw, **defaults).usage.completion_tokens >= 1
    assert client.chat.completions.create(**kw, tool_choice="auto").usage.completion_tokens >= 1
    done = client.completions.create(model=MODEL, prompt="hi", max_tokens=1, best_of=1, echo=False)
    assert done.usage.completion_tokens == 1


@pytest.mark.parametrize("params, param", BAD_CHAT_PARAMS, ids=[str(p) for p, _ in BAD_CHAT_PARAMS])
def test_bad_chat_parameter_is_a_400_naming_it(client, params, param):
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **params}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**kw)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"]
    if param is not None:
        assert param.split("[")[0] in error["message"] or param in error["message"]
    ok = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert ok.usage.completion_tokens >= 1


@pytest.mark.parametrize(
    "params, param",
    [
        ({"logprobs": 21}, "logprobs"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"echo": True}, "echo"),
        ({"suffix": "!"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"logit_bias": {"100": 100}}, "logit_bias"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ""}, "prompt"),  # was an AssertionError that took the server down
        ({"prompt": ["hi", ""]}, "prompt"),
    ],
)
def test_bad_completions_parameter_is_a_400_naming_it(client, params, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**{"model": MODEL, "prompt": "hi", **params})
    assert caught.value.status_code == 400 and caught.value.body["param"] == param
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=1).usage.completion_tokens == 1


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [(m.id, m.object, m.owned_by) for m in models] == [(MODEL, "model", "vlmd")]


def test_served_model_name_and_images_without_multimodal(text_server):
    client = openai.OpenAI(base_url=text_server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["text-demo"]
    with pytest.raises(openai.BadRequestError, match="enable_multimodal"):
        client.chat.completions.create(
            model="text-demo",
            messages=[{"role": "user", "content": [image_part(data_uri(PNG))]}],
            max_tokens=1,
        )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
    answer = client.chat.completions.create(
        model="text-demo", messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )
    assert answer.model == "text-demo" and answer.usage.completion_tokens == 1
    # Without max_tokens a chat may fill the context (--max_req_total_len 600).
    whole = client.chat.completions.create(
        model="text-demo", messages=[{"role": "user", "content": "hi"}], extra_body={"ignore_eos": True}
    )
    assert whole.choices[0].finish_reason == "length" and whole.usage.total_tokens == 600


# --- clients that leave ---------------------------------------------------------------------------


def test_client_that_disconnects_mid_stream_frees_its_pages(client, mm_server):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "a long answer"}],
        max_tokens=3000,
        stream=True,
        **GREEDY,
    )
    chunks = [next(stream) for _ in range(4)]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert metrics(mm_server)["vlmd_kv_pages_used"] > 0
    stream.close()
    assert_aborted_and_serving(mm_server)


def test_non_streaming_client_that_disconnects_frees_its_pages(mm_server):
    host, port = mm_server.url.removeprefix("http://").split(":")
    body = json.dumps(
        {"messages": [{"role": "user", "content": "long"}], "max_tokens": 3000, "n": 2, "ignore_eos": True}
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head.encode() + body)
        deadline = time.monotonic() + 10
        while metrics(mm_server)["vlmd_requests_running"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metrics(mm_server)["vlmd_requests_running"] == 2  # both choices are running
    assert_aborted_and_serving(mm_server)


def test_text_held_for_a_stop_string_goes_out_before_an_error(model_dir):
    """A chat that fails while its last text may begin a stop string: no stop string ended it, so
    it is streamed, then the error."""
    from types import SimpleNamespace

    from vlmd.actors.inflight import ClientError, Tracked
    from vlmd.actors.openai_api import Choice, Job, OpenAIApi
    from vlmd.detokenizer import StopStringText
    from vlmd.messages import TokenOut

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.encode(" one two three", add_special_tokens=False)
    actor = SimpleNamespace(
        prompts=SimpleNamespace(tokenizer=tokenizer),
        args=SimpleNamespace(served_model_name="demo", model_dir=str(model_dir)),
        forget=lambda *args: None,
    )
    api = OpenAIApi(actor)

    async def run() -> list[bytes]:
        job = Job(chat=True, logprobs=False)
        tracked = Tracked(asyncio.get_running_loop().create_future(), arrival=0.0)
        text = StopStringText(tokenizer, [" three four"])  # " three" may begin it
        job.choices.append(Choice(0, 0, "r", tracked, text))
        job.updates.put_nowait(ClientError(503, "the server is shutting down"))
        return [event async for event in api._stream(job, False, TokenOut("r", ids, [0.0] * len(ids)))]

    events = [event.removeprefix(b"data: ") for event in asyncio.run(run())]
    assert events[-1] == b"[DONE]\n\n"
    chunks = [json.loads(event) for event in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == " one two three"
    assert chunks[-1]["error"]["message"] == "the server is shutting down"
