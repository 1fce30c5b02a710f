"""Prompt ids with image placeholders expanded exactly as transformers' InternVL processor does."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from vlmd.actors.tokenizer import PromptBuilder, PromptError
from vlmd.image import TilingConfig, num_tiles


@pytest.fixture(scope="module")
def builder(model_dir) -> PromptBuilder:
    return PromptBuilder(str(model_dir), image_seq_length=256)


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def processor_ids(tokenizer, text: str, tiles: list[int]) -> list[int]:
    """What InternVLProcessor does: each <IMG_CONTEXT> becomes <img> + 256 * tiles + </img>."""
    pieces = text.split("<IMG_CONTEXT>")
    expanded = pieces[0]
    for n, piece in zip(tiles, pieces[1:], strict=True):
        expanded += "<img>" + "<IMG_CONTEXT>" * (256 * n) + "</img>" + piece
    return tokenizer(expanded).input_ids


SIZES = [(448, 448), (900, 600), (300, 1000), (2000, 150), (64, 64)]


@pytest.mark.parametrize("spelling", ["<img></img>", "<image>", "<IMG_CONTEXT>"])
def test_expansion_matches_the_processor(builder, hf_tokenizer, spelling):
    cfg = TilingConfig()
    tiles = [num_tiles(w, h, cfg) for w, h in SIZES]
    text = (
        "<|im_start|>user\n" + "".join(f"{spelling}\npicture {i}, " for i in range(len(SIZES))) + "这是什么？"
    )
    ids, spans = builder.build(text, tiles)
    assert ids == processor_ids(hf_tokenizer, text.replace(spelling, "<IMG_CONTEXT>"), tiles)
    context_id = hf_tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    for span, n in zip(spans, tiles, strict=True):
        assert span.num_tokens == 256 * n
        assert ids[span.token_offset - 1] == hf_tokenizer.convert_tokens_to_ids("<img>")
        assert set(ids[span.token_offset : span.token_offset + span.num_tokens]) == {context_id}
        assert ids[span.token_offset + span.num_tokens] == hf_tokenizer.convert_tokens_to_ids("</img>")


def test_text_only_prompt_is_plain_tokenization(builder, hf_tokenizer):
    text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi"
    assert builder.build(text, []) == (hf_tokenizer(text).input_ids, [])


@pytest.mark.parametrize(
    "text, tiles", [("no placeholder", [1]), ("<img></img><image>", [1]), ("<image>", [])]
)
def test_placeholder_count_must_match(builder, text, tiles):
    with pytest.raises(PromptError, match="placeholder"):
        builder.build(text, tiles)


def test_stop_sequences_drop_the_leading_space_token(builder, hf_tokenizer):
    im_end = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert builder.stop_token_seqs([" <|im_end|>", "<|im_end|>"]) == [[im_end], [im_end]]
    word = hf_tokenizer.encode(" the", add_special_tokens=False)
    assert builder.stop_token_seqs([" the"]) == [word]  # one token: nothing to drop


CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {
        "role": "user",
        "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "<image> two?"}],
    },
    {"role": "assistant", "content": "Two cats."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "And "}, {"type": "image"}, {"type": "text", "text": "?"}],
    },
]


def test_chat_images_go_where_the_template_puts_them(builder, hf_tokenizer):
    tiles = [1, 3, 2]
    text = builder.render_chat(CHAT)
    template = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == template and text.endswith("<|im_start|>assistant\n")
    ids, spans = builder.build_chat(text, tiles)
    assert ids == processor_ids(hf_tokenizer, template, tiles)  # "<image>" in a text part is only text
    assert [span.num_tokens for span in spans] == [256, 768, 512]


def test_chat_with_one_image_equals_the_lightllm_prompt(builder):
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    lightllm = "<|im_start|>user\n<img></img>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
    assert builder.build_chat(builder.render_chat(chat), [2]) == builder.build(lightllm, [2])


@pytest.mark.parametrize("token", ["<img>", "</img>", "<IMG_CONTEXT>"])
def test_chat_text_must_not_carry_image_tokens(builder, token):
    with pytest.raises(PromptError, match="image tokens"):
        builder.render_chat([{"role": "user", "content": f"look {token}"}])


def test_chat_images_the_template_does_not_place_are_refused(builder):
    with pytest.raises(PromptError, match="placed 1 image"):
        builder.build_chat(builder.render_chat([{"role": "user", "content": [{"type": "image"}]}]), [1, 1])


def test_token_bytes_concatenate_to_the_utf8_text(builder, hf_tokenizer):
    text = "这是什么？ héllo, wörld <|im_end|>"
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(builder.token_bytes(i) for i in ids) == text.encode()


def test_a_conversation_template_writes_an_empty_message_as_its_role_alone():
    """As OpenGVLab's get_prompt (MPT style: `ret += role` where the message is empty)."""
    from vlmd.conversation import CONVERSATIONS

    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": [{"type": "text", "text": "again"}]},
    ]
    prompt = CONVERSATIONS["internvl2_5"].render(turns)
    assert prompt.endswith(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        "<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n"
    )
