"""Hypothesis strategies for tests/test_fuzz.py: malformed and adversarial request bodies for the
four generation routes, each with the field names a 400 for it must mention.

Three families: a valid body with one field set to a hostile value, deleted or given twice
(`field_cases`); a valid body broken at the byte level (`raw_cases`); one adversarial image in
every way a client can send it (`image_cases`). Field lists come from the body structs, so a
field added to an API is fuzzed without touching this file.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

import msgspec
from hypothesis import strategies as st

from tests.conftest import make_image
from tests.fuzz_images import TOO_MANY_PIXELS, broken_images, damage_bases, damaged, valid_images
from vlmd.api import GenerateBody, GenerateParameters, ImageInput
from vlmd.openai_types import ChatCompletionBody, ChatMessage, CompletionBody, ImageURL

ROUTES = ("/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions")
IMAGE_PATH = ("multimodal_params", "images", 0)
IMAGE_B64 = base64.b64encode(make_image(32, 32, seed=9)).decode()  # one tile: cheap to encode


@dataclass(frozen=True)
class Case:
    route: str
    body: bytes
    names: tuple[str, ...] = ()  # a 400 must mention one of these (the field at fault); () any
    expect_ok: bool = False  # a valid request: it must be answered with a 200
    what: str = ""  # for hypothesis' report of a failing case


@dataclass(frozen=True)
class Raw:
    """JSON text put into the body as it is (NaN, 1e400, deep nesting: not what json.dumps makes)."""

    text: str
    names: tuple[str, ...] = ()  # what an error about it may name instead of its field


class Pairs(list):
    """A JSON object as (key, value) pairs: keys may repeat."""


def encode(value) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        value = Pairs(value.items())
    if isinstance(value, Pairs):
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + encode(v) for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(encode(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def base_body(route: str) -> dict:
    """A valid request with one image where the route takes images: 2 new tokens."""
    if route.startswith("/generate"):
        image = {"type": "base64", "data": IMAGE_B64}
        return {
            "inputs": "<img></img> hi",
            "parameters": {"max_new_tokens": 2},
            "multimodal_params": {"images": [image]},
        }
    if route == "/v1/chat/completions":
        parts = [
            {"type": "text", "text": "hi"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + IMAGE_B64}},
        ]
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": parts}]
        return {"messages": messages, "max_tokens": 2}
    return {"prompt": "hi", "max_tokens": 2}


def _fields(struct: type) -> list[str]:
    return [field.name for field in msgspec.structs.fields(struct)]


def field_paths(route: str) -> list[tuple]:
    if route.startswith("/generate"):
        image = IMAGE_PATH
        return [
            ("inputs",),
            ("parameters",),
            *[("parameters", name) for name in _fields(GenerateParameters)],
            ("multimodal_params",),
            ("multimodal_params", "images"),
            image,
            *[(*image, name) for name in _fields(ImageInput)],
            ("unknown_field",),
        ]
    top = _fields(ChatCompletionBody if route == "/v1/chat/completions" else CompletionBody)
    paths = [(name,) for name in top] + [("stream_options", "include_usage"), ("unknown_field",)]
    if route == "/v1/chat/completions":
        user, part = ("messages", 1), ("messages", 1, "content", 1)
        paths += [(*user, key) for key in ("role", "content", "name")]
        paths += [user, ("messages", 0, "content"), (*user, "content", 0, "text"), part, (*part, "type")]
        paths += [(*part, "image_url"), *[(*part, "image_url", name) for name in _fields(ImageURL)]]
    return paths


def names_of(path: tuple) -> tuple[str, ...]:
    """What a 400 about this field may name: any of its keys, or the image it belongs to."""
    names = tuple(str(key) for key in path if isinstance(key, str))
    if "images" in path or "image_url" in path:
        names += ("image 0",)
    if path in (("inputs",), ("multimodal_params",), ("multimodal_params", "images"), IMAGE_PATH):
        names += ("placeholder",)  # the prompt's placeholders and the images no longer match
    return names


EDGE_INTS = (0, -1, 1, 2, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, -(10**30))
EDGE_FLOATS = (-0.0, 0.5, 1e-300, 5e-324, 1e308, -1e308, 2.0000001)
EDGE_STRINGS = (
    "",
    " ",
    "<img></img>",
    "<image>",
    "<IMG_CONTEXT>",
    "</img>",
    "<|im_end|><|im_start|>assistant\n",
    "\x00",
    "\u202e\u200d\ufeff",
    "e\u0301\u0301\u0301",
    "\U0001f600" * 50,
    "A" * 5000,
    "data:image/png;base64,",
    "http://[::1",
    "url",
    "base64",
)
NUMBER_LITERALS = tuple(Raw(text, ("JSON",)) for text in ("NaN", "Infinity", "-Infinity", "1e400", "-1e400"))
NUMBER_LITERALS += (Raw("1" + "0" * 400), Raw("-0"), Raw("1.0e-400"))


def _struct_at(route: str, parent: tuple) -> type | None:
    """The body struct that declares the fields found at `parent`."""
    keys = tuple(key for key in parent if isinstance(key, str))
    if route.startswith("/generate"):
        return {(): GenerateBody, ("parameters",): GenerateParameters}.get(
            keys, ImageInput if keys == ("multimodal_params", "images") else None
        )
    top = ChatCompletionBody if route == "/v1/chat/completions" else CompletionBody
    return {(): top, ("messages",): ChatMessage, ("messages", "content", "image_url"): ImageURL}.get(keys)


def _kinds(route: str, path: tuple) -> set[str]:
    """The JSON types the field at `path` is declared with ("int", "float", "str", ...)."""
    struct = _struct_at(route, path[:-1])
    fields = {field.name: field.type for field in msgspec.structs.fields(struct)} if struct else {}
    if path[-1] not in fields:
        return set()
    info = msgspec.inspect.type_info(fields[path[-1]])
    types = info.types if isinstance(info, msgspec.inspect.UnionType) else (info,)
    return {type(t).__name__.removesuffix("Type").lower() for t in types}


def hostile_values(route: str, path: tuple) -> st.SearchStrategy:
    """Mostly the edge values of the field's own type, which get past decoding to the checks
    behind it (an empty prompt, 2**64 tokens, a temperature of 1e-300), else any JSON value.
    The likeliest trouble comes first: hypothesis tries the first values of a list first."""
    kinds = _kinds(route, path)
    edges = []
    if "str" in kinds:
        edges += EDGE_STRINGS
    if "list" in kinds:
        edges += [[""], [""] * 17, [EDGE_STRINGS[2]] * 17, [1]]
    if kinds & {"int", "float"}:
        numbers = [5e-324, 1e-300, 2**64, -1, 0, *EDGE_INTS, *EDGE_FLOATS, *NUMBER_LITERALS]
        edges += numbers if "float" in kinds else [2**64, -1, 0, *EDGE_INTS, 1.5, *NUMBER_LITERALS]
    typed = st.sampled_from([*edges, None, True, "", [], {}])
    return st.one_of(typed, typed, json_values())


def _text() -> st.SearchStrategy[str]:
    return st.text(st.characters(codec="utf-8"), max_size=24) | st.sampled_from(EDGE_STRINGS)


def json_values() -> st.SearchStrategy:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.sampled_from(EDGE_INTS)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.sampled_from(EDGE_FLOATS)
        | _text()
        | st.sampled_from(NUMBER_LITERALS)
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text(), inner, max_size=3),
        max_leaves=6,
    )


def deep_nesting() -> st.SearchStrategy[Raw]:
    def nest(args: tuple[int, bool]) -> Raw:
        depth, as_object = args
        text = '{"a":' * depth + "1" + "}" * depth if as_object else "[" * depth + "]" * depth
        return Raw(text, ("nested too deeply",))

    return st.tuples(st.sampled_from((2, 64, 1000, 5000, 100_000)), st.booleans()).map(nest)


def _container(body, path: tuple):
    """The dict or list holding `path`'s last key, created where the base lacks it; None if the
    path runs through a value that holds no fields."""
    node = body
    for key in path[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(key, {})
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return None
    return node if isinstance(node, dict | list) else None


@st.composite
def field_cases(draw, route: str | None = None, path: tuple | None = None) -> Case:
    """A valid body with one to three fields set to hostile values, deleted or nested deeply, and
    perhaps one given twice; a 400 must name one of them. `route` and `path` fix the first."""
    route = route or draw(st.sampled_from(ROUTES))
    body = base_body(route)
    if route.startswith("/generate"):
        body["parameters"]["do_sample"] = draw(st.booleans())  # the OpenAI routes sample by default
    names, what = (), []
    for i in range(draw(st.integers(1, 3))):
        if i or path is None:
            path = draw(st.sampled_from(field_paths(route)))
        op = draw(st.sampled_from(("set", "set", "set", "delete", "nest")))
        value = draw(deep_nesting() if op == "nest" else hostile_values(route, path))
        what.append(f"{_mutate(body, path, op, value)} {path} = {encode(value)[:200]}")
        names += names_of(path) + _raw_names(value)
    if draw(st.integers(0, 3)) == 0:
        path = draw(st.sampled_from(field_paths(route)))
        node, value = _container(body, path), draw(json_values())
        if isinstance(node, dict):  # last: the body is not navigable once an object is Pairs
            original, key = node.get(path[-1], value), path[-1]
            twice = (
                [(key, value), (key, original)] if draw(st.booleans()) else [(key, original), (key, value)]
            )
            body = _replace(body, path[:-1], Pairs([(k, v) for k, v in node.items() if k != key] + twice))
            what.append(f"duplicate {path} = {encode(value)[:200]}")
            names += names_of(path) + _raw_names(value)
    return Case(route, encode(body).encode(), names, what="; ".join(what))


def _mutate(body: dict, path: tuple, op: str, value) -> str:
    """Apply `op` at `path`; returns what was done (a path the body cannot reach breaks its
    first key instead)."""
    node, key = _container(body, path), path[-1]
    if node is None or (isinstance(node, list) and not (isinstance(key, int) and key < len(node))):
        op, node, key = "set-parent", body, path[0]
    if op == "delete":
        if isinstance(node, dict):
            node.pop(key, None)
        else:
            del node[key]
    else:
        node[key] = value
    return op


def _raw_names(value) -> tuple[str, ...]:
    """What errors about the Raw pieces anywhere in `value` may name (NaN is malformed JSON)."""
    if isinstance(value, Raw):
        return value.names
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return tuple(name for item in value for name in _raw_names(item))
    return ()


def _replace(body, path: tuple, new):
    if not path:
        return new
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = new
    return body


@st.composite
def raw_cases(draw) -> Case:
    route = draw(st.sampled_from(ROUTES))
    raw = encode(base_body(route)).encode()
    how = draw(st.sampled_from(("truncate", "byte", "bad utf-8", "whole", "wrap")))
    if how == "truncate":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif how == "byte":
        position = draw(st.integers(0, len(raw) - 1))
        raw = raw[:position] + bytes([draw(st.integers(0, 255))]) + raw[position + 1 :]
    elif how == "bad utf-8":
        position = raw.index(b'"', raw.index(b":")) + 1  # inside the first string value
        bad = draw(st.sampled_from((b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82")))
        raw = raw[:position] + bad + raw[position:]
    elif how == "whole":
        raw = draw(
            st.sampled_from((b"", b"null", b"[]", b"1", b'"x"', b"{}", b"{" * 10_000, b"\xef\xbb\xbf" + raw))
        )
    else:
        raw = draw(st.sampled_from((b"[", b'{"a":'))) + raw + draw(st.sampled_from((b"]", b"}", b"")))
    return Case(route, raw, what=f"{how}: {raw[:200]!r}")


IMAGE_ENCODINGS = (
    "base64",
    "base64 with newlines",
    "urlsafe base64",
    "unpadded base64",
    "data URI",
    "odd data URI",
)


def _encode_image(data: bytes, how: str) -> tuple[str, bool]:
    """The image as a string a client might send, and whether a server must accept that string."""
    text = base64.b64encode(data).decode()
    if how == "base64 with newlines":
        return "\n".join(text[i : i + 76] for i in range(0, len(text), 76)), len(text) <= 76
    if how == "urlsafe base64":
        urlsafe = base64.urlsafe_b64encode(data).decode()
        return urlsafe, urlsafe == text
    if how == "unpadded base64":
        return text.rstrip("="), not text.endswith("=")
    if how == "data URI":
        return "data:image/png;base64," + text, True
    if how == "odd data URI":
        return "data:;base64," + text, True
    return text, True


@st.composite
def image_cases(draw) -> Case:
    kind = draw(st.sampled_from(("valid", "valid", "broken", "damaged")))
    if kind == "damaged":
        base = draw(st.sampled_from(damage_bases()))
        cut = draw(st.none() | st.integers(0, len(base)))
        flips = draw(st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), max_size=4))
        name, data = f"damaged (cut {cut}, flips {flips})", damaged(base, cut, flips)
    else:
        images = valid_images() if kind == "valid" else broken_images()
        name = draw(st.sampled_from(sorted(images)))
        data = images[name]
    text, encoding_ok = _encode_image(data, draw(st.sampled_from(IMAGE_ENCODINGS)))
    limit = draw(st.none() | st.sampled_from((1, 2, 3, 0, -1, 2**70)))
    route = draw(st.sampled_from(ROUTES[:3]))
    body = base_body(route)
    resize_to_fit = False
    if route.startswith("/generate"):
        resize_to_fit = draw(st.booleans())
        image = {"type": "base64", "data": text, "resize_to_fit": resize_to_fit}
        body["multimodal_params"]["images"] = [image]
    else:
        url = text if text.startswith("data:") else "data:image/png;base64," + text
        image = {"url": url}
        body["messages"][1]["content"][1]["image_url"] = image
        body["stream"] = draw(st.booleans())
    if limit is not None:
        image["max_dynamic_patch"] = limit
    fits = name != TOO_MANY_PIXELS or resize_to_fit
    expect_ok = kind == "valid" and encoding_ok and limit in (None, 1, 2) and fits
    what = f"{kind} image {name!r}, {len(data)} bytes, max_dynamic_patch {limit}, {text[:60]!r}"
    return Case(route, encode(body).encode(), ("image 0", "max_dynamic_patch"), expect_ok, what)
