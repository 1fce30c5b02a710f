"""--api_key (and VLMD_API_KEY): every route but /health and /metrics needs `Authorization: Bearer
KEY`; a missing or wrong key is a 401 in the error shape of the API asked."""

from __future__ import annotations

import argparse
import json

import openai
import pytest
import requests

from tests.conftest import start_server
from tests.test_http import chat_body
from tests.test_lifecycle import assert_one_line_error, serve
from vlmd.config import add_serve_arguments, build_server_args

KEY = "sk-test-0123456789"
WRONG_KEYS = [None, "", "sk-test-012345678", KEY + "0", KEY.upper()]  # None: no header at all

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
# (method, path, JSON body, the API's error shape: "openai" or "lightllm")
ROUTES = [
    ("POST", "/generate", chat_body("hi", max_new_tokens=2), "lightllm"),
    ("POST", "/generate_stream", chat_body("hi", max_new_tokens=2), "lightllm"),
    ("POST", "/v1/chat/completions", CHAT, "openai"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}, "openai"),
    ("GET", "/v1/models", None, "openai"),
]


@pytest.fixture(scope="module")
def keyed_server(model_dir, tmp_path_factory):
    server = start_server(model_dir, tmp_path_factory.mktemp("logs"), "--api_key", KEY)
    yield server
    assert server.stop() == 0, server.log()


def call(server, method: str, path: str, body: dict | None, key: str | None) -> requests.Response:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return requests.request(method, server.url + path, json=body, headers=headers, timeout=60)


def assert_refused(response: requests.Response, shape: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"] == "Bearer"
    error = response.json()["error"]
    if shape == "openai":
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        assert "API key" in error["message"]
    else:
        assert isinstance(error, str) and "API key" in error


@pytest.mark.parametrize("method,path,body,shape", ROUTES, ids=[route[1] for route in ROUTES])
def test_every_api_route_needs_the_key(keyed_server, method, path, body, shape):
    for key in WRONG_KEYS:
        assert_refused(call(keyed_server, method, path, body, key), shape)
    response = call(keyed_server, method, path, body, KEY)
    assert response.status_code == 200, response.text
    if path == "/generate_stream":
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith(b"data:")]
        assert events[-1]["finished"]


def test_the_scheme_is_case_insensitive_and_other_schemes_are_refused(keyed_server):
    route = "POST", "/generate", chat_body("hi", max_new_tokens=2)
    response = requests.post(
        keyed_server.url + route[1], json=route[2], headers={"Authorization": f"bearer {KEY}"}, timeout=60
    )
    assert response.status_code == 200
    for header in (f"Basic {KEY}", KEY, f"Bearer  {KEY}"):
        response = requests.post(
            keyed_server.url + route[1], json=route[2], headers={"Authorization": header}, timeout=60
        )
        assert_refused(response, "lightllm")


def test_health_and_metrics_need_no_key(keyed_server):
    assert requests.get(keyed_server.url + "/health", timeout=10).status_code == 200
    response = requests.get(keyed_server.url + "/metrics", timeout=10)
    assert response.status_code == 200 and "vlmd_kv_pages_used" in response.text


def test_unknown_routes_need_the_key_too(keyed_server):
    assert_refused(requests.get(keyed_server.url + "/nope", timeout=10), "lightllm")
    assert_refused(requests.get(keyed_server.url + "/health/", timeout=10), "lightllm")
    assert call(keyed_server, "GET", "/nope", None, KEY).status_code == 404


def test_the_openai_client_sends_its_api_key(keyed_server):
    client = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    answer = client.chat.completions.create(model="demo", max_tokens=2, **{"messages": CHAT["messages"]})
    assert answer.choices[0].message.content is not None
    assert [model.id for model in client.models.list()] == ["demo"]
    wrong = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="nope", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.chat.completions.create(model="demo", max_tokens=2, messages=CHAT["messages"])
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"


def test_the_key_can_come_from_vlmd_api_key(model_dir, tmp_path):
    server = start_server(model_dir, tmp_path, env={"VLMD_API_KEY": KEY})
    try:
        for method, path, body, shape in ROUTES[::2]:
            assert_refused(call(server, method, path, body, None), shape)
            assert call(server, method, path, body, KEY).status_code == 200
        assert requests.get(server.url + "/health", timeout=10).status_code == 200
    finally:
        assert server.stop() == 0, server.log()


def args(model_dir, *flags: str, env: dict[str, str]):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return build_server_args(parser.parse_args(["--model_dir", str(model_dir), *flags]), env)


def test_the_flag_wins_over_the_environment_and_no_key_means_open(model_dir):
    assert args(model_dir, "--api_key", "from-flag", env={"VLMD_API_KEY": "from-env"}).api_key == "from-flag"
    assert args(model_dir, env={"VLMD_API_KEY": "from-env"}).api_key == "from-env"
    assert args(model_dir, env={"VLMD_API_KEY": ""}).api_key is None
    assert args(model_dir, env={}).api_key is None


def test_an_empty_api_key_flag_is_refused(model_dir):
    assert_one_line_error(serve("--model_dir", str(model_dir), "--api_key", ""), "--api_key")
