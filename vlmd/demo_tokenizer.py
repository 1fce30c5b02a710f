"""The demo model's tokenizer: a byte-level BPE trained offline on a small embedded corpus,
with the special tokens and chat template of InternVL-hf (Qwen2 chat format).

`DemoTokenizer` describes a demo tokenizer kind to `vlmd.demo`: this byte-level one (`BYTE_LEVEL`)
and the SentencePiece-style one of `vlmd.demo_sp_tokenizer`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
)
# The attribute names InternVLProcessor reads from the tokenizer (tokenizer.start_image_token, ...).
EXTRA_SPECIAL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
TOKENIZER_VOCAB_SIZE = 1000  # byte alphabet + merges + SPECIAL_TOKENS
# ChatML as the InternVL-hf repos render it: an image part becomes one <IMG_CONTEXT> line that
# the server later expands to <img> + <IMG_CONTEXT> * (image_seq_length * tiles) + </img>.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] in ('image', 'image_url') -%}{{- '<IMG_CONTEXT>\\n' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<video>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
# Qwen2's pre-tokenizer split: transformers' Qwen2Tokenizer rebuilds its pipeline with this
# pattern whatever tokenizer.json says, so ours must be the same for both to agree.
_SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
CORPUS = """
A photo of a small red cat sitting on a wooden table next to a cup of coffee.
The image shows a busy street at night, with cars, buses and bright shop signs.
What is in this picture? Please describe the image in detail.
There are three people walking a dog along the beach while the sun sets over the ocean.
The chart compares the revenue of four companies between 2019 and 2024.
A green bicycle is parked beside a blue door; flowers grow in a white pot.
Describe the colours, the objects and the text that you can see in the image.
The document is a receipt from a grocery store listing milk, bread, eggs and apples.
A mountain lake reflects snowy peaks under a clear sky with a few clouds.
Two children are playing football in a park surrounded by tall trees.
The screenshot shows a settings page with buttons, menus and a search box.
An old map of the city marks the river, the bridges, the castle and the market square.
The kitchen has a stove, a sink, a window and shelves full of plates and glasses.
This diagram explains how a neural network turns pixels into words step by step.
The answer is yes: the yellow taxi is on the left and the black truck is on the right.
A plate of noodles with vegetables, chopsticks and a bowl of soup on the side.
How many apples are on the table? I can count five apples and two oranges.
The handwritten note says: meet me at the train station at seven o'clock tomorrow.
The user asked a question about the image, and the assistant answered it politely.
Please read the sign and tell me what it says. It says "No parking on weekdays".
The weather today is sunny and warm, perfect for a walk in the garden.
A scientist looks through a microscope in a laboratory full of bottles and tubes.
The painting shows a quiet village by the sea with boats, houses and a church.
You are a helpful assistant. Answer the question using the image and the text.
The bar chart shows that sales grew by twenty percent in the second quarter.
A close-up of a flower with purple petals, a yellow centre and a bee collecting pollen.
In the video, a man opens the box, takes out a camera and starts recording.
The slide lists the main points: speed, memory, accuracy, cost and safety.
The robot arm picks up a box from the conveyor belt and places it on a shelf.
A crowded train platform during the morning rush hour in a large city.
Here is a summary of the article about climate, energy, water and food.
It's raining, so we'll stay inside, read books and watch a film together.
The table has columns for name, age, city and score, and ten rows of data.
Large language models can look at images, read text and answer questions.
这是什么？这是一只坐在窗台上的小猫。
请描述这张图片的内容。图片里有一座山、一条河和几棵树。
图中有三个人在公园里散步，天气很好。
这张照片拍的是夜晚的城市街道，路上有很多汽车和行人。
桌子上有一杯咖啡、一本书和一个红色的苹果。
请问图片中的文字是什么意思？
这是一张收据，上面写着牛奶、面包和鸡蛋的价格。
他们在海边看日落，天空是橙色和紫色的。
这个图表显示了公司从二零一九年到二零二四年的收入变化。
孩子们在学校的操场上踢足球。
我可以看到一只狗、一辆自行车和一扇蓝色的门。
你是一个有帮助的助手，请根据图片回答问题。
图片的左边是一辆黄色的出租车，右边是一辆黑色的卡车。
厨房里有炉子、水槽、窗户和放满盘子的架子。
这幅画描绘了一个安静的海边小村庄。
机器人从传送带上拿起一个箱子，放到架子上。
今天天气晴朗，适合去花园里散步。
这是一张地图，上面标出了河流、桥梁和市场。
请数一数桌子上有几个苹果。桌子上有五个苹果。
视频里，一个人打开盒子，拿出一台相机。
"""


def build_tokenizer() -> Tokenizer:
    """Train the demo's byte-level BPE on CORPUS (deterministic), special tokens appended last."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.strip().splitlines(), trainer)
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    )
    return tokenizer


@dataclass(frozen=True)
class DemoTokenizer:
    """A kind of demo tokenizer: how to build it, and what the demo's config files say about it.
    `special_tokens` are found by name in the built tokenizer; the functions take their ids."""

    build: Callable[[], Tokenizer]
    special_tokens: tuple[str, ...]
    bos_token: str  # text_config.bos_token_id
    eos_token: str  # text_config.eos_token_id
    tokenizer_config: Callable[[dict[str, int], dict[str, Any]], dict[str, Any]]  # (ids, config.json)
    generation_config: Callable[[dict[str, int]], dict[str, Any]]


def added_tokens_decoder(token_ids: dict[str, int], tokens: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json's `added_tokens_decoder`: each special token, by its id."""
    return {
        str(token_ids[token]): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token in tokens
    }


def tokenizer_config(token_ids: dict[str, int], config: dict[str, Any]) -> dict[str, Any]:
    """What transformers needs to rebuild the tokenizer offline, as the InternVL-hf repos write it."""
    added = added_tokens_decoder(token_ids, SPECIAL_TOKENS)
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": config["text_config"]["max_position_embeddings"],
        "extra_special_tokens": EXTRA_SPECIAL_TOKENS,
        "chat_template": CHAT_TEMPLATE,
    }


def generation_config(token_ids: dict[str, int]) -> dict[str, Any]:
    return {
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": [token_ids["<|im_end|>"], token_ids["<|endoftext|>"]],
        "pad_token_id": token_ids["<|endoftext|>"],
    }


BYTE_LEVEL = DemoTokenizer(
    build=build_tokenizer,
    special_tokens=SPECIAL_TOKENS,
    bos_token="<|endoftext|>",
    eos_token="<|im_end|>",
    tokenizer_config=tokenizer_config,
    generation_config=generation_config,
)
