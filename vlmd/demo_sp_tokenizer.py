"""A second demo tokenizer, in the style of a SentencePiece (Llama) BPE: what transformers' `-hf`
conversion of an InternLM2-backbone InternVL (InternVL2_5-8B-MPO-hf) ships as tokenizer.json.

Unlike the byte-level one (`vlmd.demo_tokenizer`), text is not mapped to bytes first: spaces become
"▁" (Metaspace), pieces are characters and their merges, and a character outside the vocabulary
falls back to its UTF-8 bytes, each a `<0xNN>` token. Ids 0, 1, 2 are `<unk>`, `<s>`, `</s>`, ids
3..258 the 256 byte tokens, as in Llama's and InternLM2's vocabularies; `<s>` starts every encoded
text (a template post-processor), and the chat special tokens come last, `<|im_end|>` before
`<|im_start|>` as in InternLM2's.
"""

from __future__ import annotations

import json
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from vlmd.demo_tokenizer import CHAT_TEMPLATE, CORPUS, DemoTokenizer, added_tokens_decoder

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
BYTE_TOKENS = tuple(f"<0x{byte:02X}>" for byte in range(256))
CHAT_TOKENS = (
    "<|im_end|>",
    "<|im_start|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
)
SPECIAL_TOKENS = (UNK, BOS, EOS, *CHAT_TOKENS)
# Phi-3's chat tokens (InternVL2-4B's phi3-chat template), after the others: the Phi-3 kind is this
# vocabulary with four more ids at its end.
PHI3_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
EXTRA_SPECIAL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
}
SP_VOCAB_SIZE = 1000  # <unk> <s> </s> + bytes + pieces + CHAT_TOKENS


def build_sp_tokenizer(extra_tokens: tuple[str, ...] = ()) -> Tokenizer:
    """The SentencePiece-style BPE trained on the demo corpus (deterministic); `extra_tokens`
    are special tokens after all the others."""
    pieces, merges = _train_pieces()
    vocab = {token: i for i, token in enumerate((UNK, BOS, EOS, *BYTE_TOKENS, *pieces))}
    assert len(vocab) == 3 + len(BYTE_TOKENS) + len(pieces), "a trained piece collides with a base token"
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token=UNK, fuse_unk=True, byte_fallback=True))
    # The pipeline transformers 5's LlamaTokenizer rebuilds from this file's vocab and merges (with
    # add_prefix_space false): no normalizer, Metaspace with no "▁" prepended (InternLM2 adds no
    # dummy prefix; the -hf conversion sets prepend_scheme "never") and no split. Writing the same
    # pipeline here keeps the raw tokenizer.json and transformers' tokenizer in agreement.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in (*SPECIAL_TOKENS, *extra_tokens)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, vocab[BOS])]
    )
    return tokenizer


def _train_pieces() -> tuple[list[str], list[tuple[str, str]]]:
    """The trained pieces (characters, then merges, in id order) and merges. Training splits at
    every "▁" so that, as in SentencePiece, no merge spans two words; the served pipeline does not
    split, which gives the same tokens since no merge can join across a "▁"."""
    trainer_model = Tokenizer(models.BPE())
    trainer_model.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="never", split=True
    )
    trainer = trainers.BpeTrainer(
        vocab_size=SP_VOCAB_SIZE - 3 - len(BYTE_TOKENS) - len(CHAT_TOKENS), show_progress=False
    )
    trainer_model.train_from_iterator(CORPUS.strip().splitlines(), trainer)
    model = json.loads(trainer_model.to_str())["model"]
    pieces = sorted(model["vocab"], key=model["vocab"].get)
    return pieces, [tuple(merge) for merge in model["merges"]]


def sp_tokenizer_config(
    token_ids: dict[str, int], config: dict[str, Any], special_tokens: tuple[str, ...] = SPECIAL_TOKENS
) -> dict[str, Any]:
    """tokenizer_config.json as the InternLM2-backbone -hf repos write it: a Llama fast tokenizer
    that adds `<s>` and no `</s>`, and the same chat template as the byte-level demo."""
    return {
        # transformers 5 maps both names to LlamaTokenizer, a TokenizersBackend that rebuilds the
        # pipeline (see build_sp_tokenizer); add_prefix_space false keeps its Metaspace from
        # prepending "▁", legacy false is what the conversion passed.
        "tokenizer_class": "LlamaTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": False,
        "added_tokens_decoder": added_tokens_decoder(token_ids, special_tokens),
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": UNK,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["text_config"]["max_position_embeddings"],
        "extra_special_tokens": EXTRA_SPECIAL_TOKENS,
        "chat_template": CHAT_TEMPLATE,
    }


def sp_generation_config(token_ids: dict[str, int]) -> dict[str, Any]:
    """The -hf conversion stops on <|im_end|>, while text_config keeps InternLM2's </s> as EOS."""
    return {
        "bos_token_id": token_ids[BOS],
        "eos_token_id": token_ids["<|im_end|>"],
        "pad_token_id": token_ids[EOS],
    }


SENTENCEPIECE = DemoTokenizer(
    build=build_sp_tokenizer,
    special_tokens=SPECIAL_TOKENS,
    bos_token=BOS,
    eos_token=EOS,
    tokenizer_config=sp_tokenizer_config,
    generation_config=sp_generation_config,
)


PHI3_SENTENCEPIECE = DemoTokenizer(
    build=lambda: build_sp_tokenizer(PHI3_TOKENS),
    special_tokens=(*SPECIAL_TOKENS, *PHI3_TOKENS),
    bos_token=BOS,
    eos_token=EOS,
    tokenizer_config=lambda token_ids, config: sp_tokenizer_config(
        token_ids, config, (*SPECIAL_TOKENS, *PHI3_TOKENS)
    ),
    generation_config=lambda token_ids: {
        "bos_token_id": token_ids[BOS],
        "eos_token_id": [token_ids[EOS], token_ids["<|assistant|>"], token_ids["<|end|>"]],  # Phi-3's
        "pad_token_id": token_ids[EOS],
    },
)
