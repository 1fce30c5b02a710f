"""POST /generate_stream: server-sent events, one per token, as LightLLM emits them."""

from __future__ import annotations

import base64
import json
import time

import requests

from tests.conftest import make_image
from tests.test_http import chat_body, generate, metrics

IMAGE = base64.b64encode(make_image(700, 400, seed=21)).decode()


def stream(server, body) -> list[dict]:
    with requests.post(server.url + "/generate_stream", json=body, stream=True, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith(
            "text/event-stream"
        )
        return [json.loads(line[5:]) for line in response.iter_lines() if line.startswith(b"data:")]


def test_streamed_text_equals_generate(mm_server):
    body = chat_body("<img></img> what is this?", max_new_tokens=40, ignore_eos=True)
    body["multimodal_params"] = {"images": [{"type": "base64", "data": IMAGE}]}
    events = stream(mm_server, body)
    whole = generate(mm_server, body).json()
    assert len(events) == 40 and [e["token"]["count_output_tokens"] for e in events] == list(range(1, 41))
    assert [e["token"]["id"] for e in events] == [t["id"] for t in whole["tokens"]]
    assert "".join(e["token"]["text"] for e in events) == whole["generated_text"][0]
    assert [e["finished"] for e in events] == [False] * 39 + [True]
    assert events[-1]["generated_text"] == whole["generated_text"][0]
    assert events[-1]["finish_reason"] == "length"
    assert events[0]["token"]["prompt_tokens"] == whole["prompt_tokens"]
    # LightLLM's details: with return_details (chat_body's), on the last event.
    assert [e["details"] for e in events] == [None] * 39 + [
        {"generated_tokens": 40, "finish_reason": "length"}
    ]


def test_events_carry_no_details_unless_asked(mm_server):
    events = stream(mm_server, chat_body("hello", max_new_tokens=5, ignore_eos=True, return_details=False))
    assert [e["details"] for e in events] == [None] * 5 and events[-1]["finished"]


def test_tokens_held_for_a_stop_sequence_go_out_before_an_error(model_dir):
    """A request that fails while its last tokens may begin a stop sequence: no stop sequence
    ended them, so their events go out, then the error's."""
    import asyncio
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from vlmd.actors.inflight import ClientError, Tracked
    from vlmd.actors.lightllm_api import LightLLMApi
    from vlmd.messages import TokenOut

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.encode(" one two three", add_special_tokens=False)
    prompts = SimpleNamespace(tokenizer=tokenizer, decode=tokenizer.decode)
    forgotten = []
    api = LightLLMApi(SimpleNamespace(prompts=prompts, forget=lambda *args: forgotten.append(args)))

    async def run() -> list[dict]:
        tracked = Tracked(asyncio.get_running_loop().create_future(), arrival=0.0, token_ids=list(ids))
        first = TokenOut("r", ids, [0.0] * len(ids))
        tracked.updates.put_nowait(ClientError(503, "the server is shutting down"))
        stops = [[ids[-2], ids[-1], 7]]  # the last two tokens may begin it
        events = api._events("r", tracked, first, stops, details=False)
        return [json.loads(event[5:]) async for event in events]

    events = asyncio.run(run())
    assert [e["token"]["id"] for e in events[:-1]] == ids
    assert events[-1] == {"error": "the server is shutting down", "finished": True, "finish_reason": None}
    assert len(forgotten) == 1


def test_stop_sequence_text_is_not_streamed(mm_server):
    tokens = generate(mm_server, chat_body("hello", max_new_tokens=12, ignore_eos=True)).json()["tokens"]
    # A token whose text is whole characters, so the stop string maps back to that token.
    stop = next(t["text"] for t in tokens[2:] if t["text"].strip() and "\ufffd" not in t["text"])
    body = chat_body("hello", max_new_tokens=12, ignore_eos=True, stop_sequences=[" " + stop])
    events = stream(mm_server, body)
    whole = generate(mm_server, body).json()
    assert events[-1]["finish_reason"] == "stop" == whole["finish_reason"]
    assert "".join(e["token"]["text"] for e in events) == whole["generated_text"][0]


def test_no_token_of_a_multi_token_stop_sequence_is_streamed(mm_server, model_dir):
    """A stop sequence of two tokens: the first is held back until the second decides, so the
    streamed texts add up to the generated text, which leaves the stop sequence out."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = generate(mm_server, chat_body("hello", max_new_tokens=16, ignore_eos=True)).json()["tokens"]
    ids = [t["id"] for t in tokens]
    at = next(
        i
        for i in range(2, len(ids) - 1)
        if tokenizer.encode(tokenizer.decode(ids[i : i + 2]), add_special_tokens=False) == ids[i : i + 2]
        and tokenizer.decode(ids[i : i + 1]).strip()  # a leading space token would be dropped
        and ids[i : i + 2] not in [ids[j : j + 2] for j in range(i)]
    )
    body = chat_body(
        "hello", max_new_tokens=16, ignore_eos=True, stop_sequences=[tokenizer.decode(ids[at : at + 2])]
    )
    events = stream(mm_server, body)
    whole = generate(mm_server, body).json()
    assert whole["finish_reason"] == "stop" and whole["count_output_tokens"] == at + 2
    assert [e["token"]["id"] for e in events] == ids[:at] + [ids[at + 1]]  # the last ends the stream
    assert "".join(e["token"]["text"] for e in events) == whole["generated_text"][0]
    assert events[-1]["finished"] and events[-1]["token"]["count_output_tokens"] == at + 2


def assert_aborted_and_serving(server) -> None:
    """Within a few steps of the disconnect the request holds no KV page; the next one is served."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        values = metrics(server)
        if values["vlmd_kv_pages_used"] == 0 and values["vlmd_requests_running"] == 0:
            break
        time.sleep(0.1)
    assert values["vlmd_kv_pages_used"] == 0 and values["vlmd_requests_running"] == 0
    assert generate(server, chat_body("hi", max_new_tokens=2)).status_code == 200


def test_client_that_disconnects_frees_its_pages(mm_server):
    body = chat_body("a long answer please", max_new_tokens=3000, ignore_eos=True)
    with requests.post(mm_server.url + "/generate_stream", json=body, stream=True, timeout=60) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]  # a few events (blank separator lines included)
        assert any(line.startswith(b"data:") for line in received)
        assert metrics(mm_server)["vlmd_kv_pages_used"] > 0
    assert_aborted_and_serving(mm_server)


def test_bad_stream_request_is_a_json_4xx(mm_server):
    response = requests.post(mm_server.url + "/generate_stream", json={"parameters": {}}, timeout=30)
    assert response.status_code == 400 and "inputs" in response.json()["error"]


def test_non_streaming_client_that_disconnects_frees_its_pages(mm_server):
    import socket

    host, port = mm_server.url.removeprefix("http://").split(":")
    body = json.dumps(chat_body("a long answer please", max_new_tokens=3000, ignore_eos=True)).encode()
    head = f"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head.encode() + body)
        deadline = time.monotonic() + 10
        while metrics(mm_server)["vlmd_kv_pages_used"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metrics(mm_server)["vlmd_kv_pages_used"] > 0  # the request is running
    assert_aborted_and_serving(mm_server)
