"""Every dense InternVL backbone, served from its on-disk format as published, gives transformers'
greedy tokens (float32, CPU) through the real HTTP server.

OpenGVLab's checkpoints (Qwen2, InternLM2, Llama, Qwen3, Phi-3 backbones) are written by inverting
transformers' own conversion (`vlmd.demo_opengvlab`), so transformers on the HF-native directory
they came from is the reference; the HF-native Llama, Qwen3 and Phi-3 models are served directly.
Each OpenGVLab case renders chats another way: OpenGVLab's conversation template (no chat
template in the tokenizer), a chat template over content parts, one over string content.
"""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from openai import OpenAI

from tests.conftest import make_image, start_server
from tests.test_lifecycle import assert_one_line_error, serve
from tests.test_parity import IMG_A, IMG_B, IMG_C, Reference, hf_prompt
from vlmd.demo import write_demo_model
from vlmd.demo_opengvlab import hf_demo_options, write_opengvlab_model
from vlmd.image import TilingConfig, num_tiles
from vlmd.models.config import InternVLArch


@dataclass(frozen=True)
class Case:
    backbone: str
    layout: str  # "opengvlab" or "hf": the directory the server loads
    chat_template: str = "none"  # OpenGVLab dirs: none (conversation template), parts, string
    generation_config: bool = True


CASES = {
    "qwen2-opengvlab": Case("qwen2", "opengvlab", "none"),
    "internlm2-opengvlab": Case("internlm2", "opengvlab", "none", generation_config=False),
    "llama-opengvlab": Case("llama", "opengvlab", "parts"),
    "qwen3-opengvlab": Case("qwen3", "opengvlab", "string"),
    "phi3-opengvlab": Case("phi3", "opengvlab", "none"),
    "llama-hf": Case("llama", "hf"),
    "qwen3-hf": Case("qwen3", "hf"),
    "phi3-hf": Case("phi3", "hf"),
}
IMG_D = make_image(1000, 300, seed=9, fmt="JPEG")  # 3 x 1 tiles + thumbnail
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def chat(user: str) -> str:
    return f"{SYSTEM}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def write_case(root: Path, case: Case) -> tuple[Path, Path]:
    """(the HF-native reference directory, the directory the server loads)."""
    hf_dir = root / "hf"
    write_demo_model(hf_dir, seed=3, **hf_demo_options(case.backbone))
    if case.layout == "hf":
        return hf_dir, hf_dir
    served = root / "opengvlab"
    write_opengvlab_model(
        hf_dir,
        served,
        case.backbone,
        num_shards=2,
        chat_template=case.chat_template,
        generation_config=case.generation_config,
    )
    return hf_dir, served


@dataclass
class Served:
    case: Case
    reference: Reference
    url: str
    model_dir: Path


@pytest.fixture(scope="module", params=list(CASES))
def served(request, tmp_path_factory):
    case = CASES[request.param]
    hf_dir, model_dir = write_case(tmp_path_factory.mktemp(request.param), case)
    flags = ["--enable_multimodal", "--visual_infer_batch_size", "4"]
    if case.backbone == "internlm2" and case.layout == "opengvlab":
        flags.append("--trust_remote_code")
    server = start_server(model_dir, tmp_path_factory.mktemp("logs"), *flags)
    yield Served(case, Reference(hf_dir), server.url, model_dir)
    assert server.stop() == 0, server.log()
    assert server.actor_pids() == [] and server.shm_segments() == []


def generate(url: str, prompt: str, images: list[bytes], num_tokens: int, allow_refusal: bool = False):
    """The greedy tokens (with `allow_refusal`, a 400 for a prompt beyond the context is its status)."""
    body = {
        "inputs": prompt,
        "parameters": {"max_new_tokens": num_tokens, "ignore_eos": True, "return_details": True},
        "multimodal_params": {
            "images": [{"type": "base64", "data": base64.b64encode(d).decode()} for d in images]
        },
    }
    response = requests.post(url + "/generate", json=body, timeout=300)
    if allow_refusal and response.status_code == 400 and "max_req_total_len" in response.text:
        return 400
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["tokens"]]


MIXED = [
    (chat("Tell me a story about a red fox."), [], 32),
    (chat("<img></img>\nWhat is in this picture?"), [IMG_A], 33),
    (chat("<img></img>\n<image>\nCompare these two images."), [IMG_A, IMG_B], 34),
    (chat("A longer question about several things: " + "why, " * 30 + "and how?"), [], 35),
    (chat("<IMG_CONTEXT>\nwhat?"), [IMG_D], 36),
    (chat("<img></img><img></img> two"), [IMG_B, IMG_C], 37),
    (chat("Count to ten."), [], 38),
    (chat("<image> and text after the image"), [IMG_C], 39),
]


def test_concurrent_mixed_requests_give_transformers_tokens(served):
    """Text only, one image, two images of different sizes, 8 at once: every request's greedy
    tokens equal transformers' on the HF-native weights, one request at a time. A request beyond
    the context vlmd serves (Phi-3's original 4,096 tokens) is a 400 saying so."""
    context = InternVLArch.from_model_dir(served.model_dir).max_position_embeddings
    fits = [served.reference.inputs(hf_prompt(p), imgs)[0].shape[1] + n <= context for p, imgs, n in MIXED]
    assert sum(fits) >= 6 and fits[1] and fits[-1], "too few requests fit to prove much"
    expected = [
        served.reference.generate(hf_prompt(p), imgs, n) if fit else None
        for (p, imgs, n), fit in zip(MIXED, fits, strict=True)
    ]
    assert len(set(expected[0])) >= 8, "the test model must not repeat itself, or this test proves little"
    assert expected[1] != served.reference.generate(hf_prompt(MIXED[1][0]), [IMG_B], 33), "ignores its image"
    with ThreadPoolExecutor(len(MIXED)) as pool:
        got = list(pool.map(lambda r: generate(served.url, *r, allow_refusal=True), MIXED))
    for (prompt, _, _), want, have in zip(MIXED, expected, got, strict=True):
        if want is None:
            assert have == 400, f"{served.case}: beyond the context, yet {have}: {prompt[:80]!r}"
        else:
            assert have == want, f"{served.case}: {prompt[:80]!r}"


# What each OpenGVLab chat mode must render for one user turn with an image part before its text
# (OpenGVLab's chat(): "<image>\n" + question), as the HF reference prompt, <IMG_CONTEXT> for the image.
INTERNVL2_5_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
INTERNVL2_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
CHAT_PROMPTS = {
    "qwen2-opengvlab": f"<|im_start|>system\n{INTERNVL2_5_SYSTEM}<|im_end|>\n<|im_start|>user\n"
    "<IMG_CONTEXT>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n",
    "internlm2-opengvlab": f"<|im_start|>system\n{INTERNVL2_SYSTEM}<|im_end|><|im_start|>user\n"
    "<IMG_CONTEXT>\nWhat is this?<|im_end|><|im_start|>assistant\n",
    "llama-opengvlab": "<|im_start|>user\n<IMG_CONTEXT>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n",
    "qwen3-opengvlab": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<IMG_CONTEXT>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n",
    "phi3-opengvlab": f"<|system|>\n{INTERNVL2_SYSTEM}<|end|><|user|>\n<IMG_CONTEXT>\nWhat is this?<|end|>"
    "<|assistant|>\n",
}


def test_chat_renders_as_the_checkpoint_prescribes(served):
    """OpenAI chat with an image: the prompt is the checkpoint's own (OpenGVLab's conversation
    template where the tokenizer has no chat template), and the answer transformers' tokens."""
    name = next(key for key, case in CASES.items() if case == served.case)
    if name not in CHAT_PROMPTS:
        pytest.skip("the -hf conversions' chat template is covered by tests/test_openai.py")
    image = base64.b64encode(IMG_B).decode()
    client = OpenAI(base_url=served.url + "/v1", api_key="unused")
    answer = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{image}"}},
                    {"type": "text", "text": "What is this?"},
                ],
            }
        ],
        max_tokens=24,
        temperature=0,
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    want = served.reference.generate(CHAT_PROMPTS[name], [IMG_B], 24)
    tokenizer = served.reference.tokenizer
    expected_prompt = len(tokenizer(CHAT_PROMPTS[name].replace("<IMG_CONTEXT>", "<img></img>")).input_ids)
    image_tokens = 256 * num_tiles(300, 700, TilingConfig())  # IMG_B
    assert answer.usage.prompt_tokens == expected_prompt + image_tokens, (
        "not the prompt the checkpoint prescribes"
    )
    assert answer.choices[0].message.content == tokenizer.decode(want, skip_special_tokens=True)


def test_remote_code_tokenizer_is_refused_without_the_flag(tmp_path):
    """An InternLM2 checkpoint's tokenizer ships as code: without --trust_remote_code the start
    stops with one line naming the flag."""
    hf_dir, model_dir = write_case(tmp_path, CASES["internlm2-opengvlab"])
    result = serve("--model_dir", str(model_dir), "--enable_multimodal")
    assert_one_line_error(result, "--trust_remote_code")
    assert "InternLM2Tokenizer" in result.stderr


def test_seed_command_serves_internlm2_split_over_two_ranks(tmp_path):
    """The user's reference command, as written (two tensor-parallel ranks, gloo on the CPU), on
    an InternLM2 checkpoint as OpenGVLab publishes it: each rank reads its heads' rows of the
    packed wqkv, and the tokens are transformers'."""
    hf_dir, model_dir = write_case(tmp_path / "model", CASES["internlm2-opengvlab"])
    server = start_server(
        model_dir,
        tmp_path,
        *("--tp", "2", "--mem_fraction", "0.8", "--trust_remote_code", "--enable_multimodal"),
        env={"INTERNVL_IMAGE_LENGTH": "256", "LOADWORKER": "12"},
    )
    reference = Reference(hf_dir)
    requests_ = [MIXED[0], MIXED[1], MIXED[2]]  # text only, one image, two images of different sizes
    try:
        for prompt, images, num_tokens in requests_:
            want = reference.generate(hf_prompt(prompt), images, num_tokens)
            assert generate(server.url, prompt, images, num_tokens) == want, prompt[:80]
    finally:
        assert server.stop() == 0, server.log()
    assert server.actor_pids() == [] and server.shm_segments() == []


@pytest.mark.parametrize(
    ("case", "chat_template", "generation_config", "mode", "eos"),
    [
        ("internlm2-opengvlab", "none", False, "conversation", ["<|im_end|>"]),
        ("internlm2-opengvlab", "none", True, "conversation", ["<|im_end|>", "<|im_start|>"]),
        ("qwen2-opengvlab", "parts", False, "parts", ["<|im_end|>"]),
        ("qwen2-opengvlab", "string", True, "string", ["<|im_start|>", "<|im_end|>"]),
    ],
)
def test_chat_mode_and_eos_come_from_the_checkpoint(
    tmp_path, case, chat_template, generation_config, mode, eos
):
    """EOS: generation_config.json's, else the conversation template's stop token (<|im_end|>,
    not InternLM2's own eos_token_id, </s>); the chat rendering follows the tokenizer's template,
    else OpenGVLab's conversation template named by config.json."""
    from vlmd.actors.tokenizer import PromptBuilder

    spec = CASES[case]
    _, model_dir = write_case(
        tmp_path, Case(spec.backbone, "opengvlab", chat_template, generation_config=generation_config)
    )
    arch = InternVLArch.from_model_dir(model_dir)
    builder = PromptBuilder(str(model_dir), 256, trust_remote_code=True, conversation=arch.template)
    assert builder.chat_mode == mode
    assert builder.eos_token_ids == builder.tokenizer.convert_tokens_to_ids(eos)
    assert builder.tokenizer.eos_token_id not in builder.eos_token_ids or spec.backbone != "internlm2"


def test_image_tokens_are_found_by_name(tmp_path):
    """The image tokens are looked up by name (their ids differ in every family); a tokenizer
    without one is refused, naming it."""
    from vlmd.actors.tokenizer import PromptBuilder

    _, model_dir = write_case(tmp_path, CASES["internlm2-opengvlab"])
    builder = PromptBuilder(str(model_dir), 256, trust_remote_code=True)
    assert (builder.start_id, builder.end_id, builder.context_id) == (991, 992, 993)  # not Qwen's
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = model_dir / name
        path.write_text(path.read_text().replace("</img>", "</picture>"))
    with pytest.raises(ValueError, match="no </img> token"):
        PromptBuilder(str(model_dir), 256, trust_remote_code=True)
