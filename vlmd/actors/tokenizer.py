"""The tokenizer actor's work: prompt ids with image placeholders expanded, stop sequences,
detokenization. It lives in the http process (the architecture allows them to share one).

Each image becomes `<img>` + `<IMG_CONTEXT>` x (tiles x image tokens per tile) + `</img>`,
exactly what transformers' InternVL processor produces. A LightLLM-style prompt may spell the
placeholder three ways, one per image, in order: LightLLM's `<img></img>`, `<image>`, and
`<IMG_CONTEXT>` as the HF chat template writes it. The three image tokens are found by name in
the tokenizer, never by assumed ids.

A chat (OpenAI messages) is rendered by the tokenizer's chat template where it has one, and
only the placeholder the template writes for an image part counts: `<IMG_CONTEXT>` (the -hf
conversions) or `<image>` (OpenGVLab's). A template that only takes string content (InternVL2's
Qwen-style ones) gets each image as `<image>` + newline at its place in the text. Without a chat
template, OpenGVLab's conversation template named by config.json (`vlmd.conversation`) renders
it, as InternVL's own chat() does.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from transformers import AutoTokenizer

from vlmd.conversation import CONVERSATIONS, IMAGE_PLACEHOLDER, flatten_content


class PromptError(ValueError):
    """The prompt does not fit its images (or the server's limits)."""


@dataclass(frozen=True)
class ImageSpan:
    token_offset: int  # index of the first <IMG_CONTEXT> token
    num_tokens: int


class PromptBuilder:
    def __init__(
        self,
        model_dir: str,
        image_seq_length: int,
        trust_remote_code: bool = False,
        conversation: str | None = None,
    ) -> None:
        """`conversation`: the name of OpenGVLab's template (config.json "template"), used for
        chats when the tokenizer has no chat template and for the EOS without a generation config."""
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        self.image_seq_length = image_seq_length
        self.start_token = getattr(self.tokenizer, "start_image_token", "<img>")
        self.end_token = getattr(self.tokenizer, "end_image_token", "</img>")
        self.context_token = getattr(self.tokenizer, "context_image_token", "<IMG_CONTEXT>")
        self.start_id, self.end_id, self.context_id = (
            self._token_id(token) for token in (self.start_token, self.end_token, self.context_token)
        )
        self.image_tokens = (self.start_token, self.end_token, self.context_token)
        self._image_text = self.start_token + self.context_token + self.end_token  # an image, once
        spellings = [self.start_token + self.end_token, IMAGE_PLACEHOLDER, self.context_token]
        self._placeholder = re.compile("|".join(re.escape(s) for s in spellings))
        self.conversation = CONVERSATIONS.get(conversation) if conversation else None
        self.chat_mode, self.chat_placeholder = self._chat_mode()
        self._template_placeholder = re.compile(re.escape(self.chat_placeholder))
        self.eos_token_ids = _eos_token_ids(model_dir, self.tokenizer, self.conversation)
        self._byte_values = _byte_level_alphabet()
        self._vocabulary = _vocabulary_kind(self.tokenizer)
        self._token_bytes: dict[int, bytes] = {}

    def _token_id(self, token: str) -> int:
        """The id of a token the tokenizer must have, or ValueError naming it."""
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        unknown = self.tokenizer.unk_token_id
        if token_id is None or (token_id == unknown and token != self.tokenizer.unk_token):
            raise ValueError(f"the tokenizer has no {token} token: not an InternVL tokenizer")
        return token_id

    def _chat_mode(self) -> tuple[str | None, str]:
        """How chats are rendered ("parts", "string", "conversation", or None: no chat) and the
        placeholder the rendered text holds for each image."""
        if not self.tokenizer.chat_template:
            return ("conversation" if self.conversation else None), IMAGE_PLACEHOLDER
        probe = "vlmd probe text"
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": probe}]}]
        try:
            rendered = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception:  # a template that concatenates the content as a string raises on a list
            return "string", IMAGE_PLACEHOLDER
        for placeholder in (self.context_token, IMAGE_PLACEHOLDER):
            if rendered.count(placeholder) == 1 and probe in rendered and "'type'" not in rendered:
                return "parts", placeholder
        return "string", IMAGE_PLACEHOLDER

    def build(self, text: str, tiles_per_image: list[int]) -> tuple[list[int], list[ImageSpan]]:
        """Token ids of `text` with one image expanded per placeholder."""
        segments = self._placeholder.split(text)
        if len(segments) - 1 != len(tiles_per_image):
            raise PromptError(
                f"the prompt has {len(segments) - 1} image placeholder(s) (<img></img>, <image> or "
                f"{self.context_token}) but the request carries {len(tiles_per_image)} image(s)"
            )
        return self._expand(segments, tiles_per_image)

    def build_text(self, text: str, tiles_per_image: list[int] = ()) -> tuple[list[int], list[ImageSpan]]:
        """Token ids of a prompt that carries no images (/v1/completions): `<image>` is text there,
        the image tokens are refused (they would stand for an image that is not sent)."""
        assert not tiles_per_image, "a text prompt carries no images"
        if any(token in text for token in self.image_tokens):
            raise PromptError(
                f"the prompt must not contain image tokens ({', '.join(self.image_tokens)}): this route "
                "takes no images; send them to /v1/chat/completions or /generate"
            )
        return self._expand([text], [])

    def render_chat(self, messages: list[dict]) -> str:
        """The chat's text for `messages`, ready for the assistant's answer. Content parts are
        `{"type": "text", "text": ...}` or `{"type": "image"}`; the text holds a placeholder
        (`chat_placeholder`) where each image is. The text parts must not contain image tokens."""
        if self.chat_mode is None:
            raise PromptError(
                "the model has neither a chat template nor a known conversation template: "
                "use /v1/completions or /generate"
            )
        forbidden = (*self.image_tokens, self.chat_placeholder)
        for message in messages:
            content = message["content"]
            texts = [content] if isinstance(content, str) else [p.get("text", "") for p in content]
            if any(token in text for text in texts for token in forbidden):
                raise PromptError(
                    f"the text of the messages must not contain image tokens ({', '.join(dict.fromkeys(forbidden))}): "
                    "send images as image_url parts"
                )
        if self.chat_mode == "conversation":
            return self.conversation.render(messages)
        if self.chat_mode == "string":
            messages = [{**m, "content": flatten_content(m["content"])} for m in messages]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def build_chat(self, text: str, tiles_per_image: list[int]) -> tuple[list[int], list[ImageSpan]]:
        """Token ids of a rendered chat with one image expanded per template placeholder. A chat
        template writes its own special tokens (BOS included), as transformers' apply_chat_template
        tokenizes it; OpenGVLab's chat() tokenizes its conversation with them added."""
        segments = self._template_placeholder.split(text)
        if len(segments) - 1 != len(tiles_per_image):
            raise PromptError(
                f"the model's chat template placed {len(segments) - 1} image(s) of the "
                f"{len(tiles_per_image)} in the messages"
            )
        return self._expand(segments, tiles_per_image, add_special_tokens=self.chat_mode == "conversation")

    def _expand(
        self, segments: list[str], tiles_per_image: list[int], add_special_tokens: bool = True
    ) -> tuple[list[int], list[ImageSpan]]:
        # The whole text is encoded at once, each image as <img><IMG_CONTEXT></img>, then each
        # <IMG_CONTEXT> repeated for the image's tokens: special tokens are never merged across, so
        # these are the ids of the expanded text, as OpenGVLab's chat() and transformers' processor
        # encode it. (Encoding the pieces between images one by one is not: a SentencePiece
        # tokenizer that prepends a space to what it encodes, as Phi-3's does, would put one at the
        # start of every piece.)
        text = self._image_text.join(segments)
        if not text and not add_special_tokens:
            return [], []
        encoded = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        if encoded.count(self.context_id) != len(tiles_per_image):
            raise PromptError(f"the text around the images must not contain {self.context_token}")
        ids: list[int] = []
        spans: list[ImageSpan] = []
        tiles = iter(tiles_per_image)
        for token_id in encoded:
            if token_id != self.context_id:
                ids.append(token_id)
                continue
            num_tokens = next(tiles) * self.image_seq_length
            spans.append(ImageSpan(len(ids), num_tokens))
            ids += [self.context_id] * num_tokens
        return ids, spans

    def stop_token_seqs(self, stop_sequences: list[str]) -> list[list[int]]:
        """Token sequences that end generation, as LightLLM derives them: the leading space the
        seed's client puts before `<|im_end|>` only shields it from a dropped first token."""
        seqs = []
        for text in stop_sequences:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) > 1 and not self.tokenizer.decode(ids[:1]).strip():
                ids = ids[1:]
            if ids:
                seqs.append(ids)
        return seqs

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (part of a UTF-8 character, for some tokens): a byte-level
        piece through GPT-2's alphabet, a SentencePiece byte-fallback piece `<0xNN>` as its byte,
        another SentencePiece piece as UTF-8 with `▁` a space."""
        cached = self._token_bytes.get(token_id)
        if cached is None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if token_id in self.tokenizer.added_tokens_decoder or not piece:
                cached = self.token_text(token_id).encode()
            elif self._vocabulary == "sentencepiece":
                byte = _BYTE_FALLBACK.fullmatch(piece)
                cached = bytes([int(byte[1], 16)]) if byte else piece.replace("\u2581", " ").encode()
            elif self._vocabulary == "byte-level" and all(char in self._byte_values for char in piece):
                cached = bytes(self._byte_values[char] for char in piece)
            else:
                cached = self.token_text(token_id).encode()
            self._token_bytes[token_id] = cached
        return cached


def _eos_token_ids(model_dir: str, tokenizer, conversation) -> list[int]:
    """The tokens that end generation: generation_config.json's eos_token_id; without one, the
    stop token of OpenGVLab's conversation template (what InternVL's chat() stops on: the LM's
    own eos_token_id is another token in InternLM2 checkpoints), else the tokenizer's EOS."""
    path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    if conversation is not None:
        return [tokenizer.convert_tokens_to_ids(conversation.stop_token)]
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _vocabulary_kind(tokenizer) -> str:
    """How the vocabulary spells a space: "byte-level" (GPT-2's `Ġ`: Qwen2, Llama 3),
    "sentencepiece" (`▁`, with `<0xNN>` byte fallback: InternLM2, Llama 2), or "other"."""
    pieces = "".join(
        p or "" for p in tokenizer.convert_ids_to_tokens(tokenizer.encode("a b", add_special_tokens=False))
    )
    if "\u2581" in pieces:
        return "sentencepiece"
    return "byte-level" if "\u0120" in pieces else "other"


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE writes each byte as a printable character (GPT-2's map): the inverse."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars = {byte: chr(byte) for byte in printable}
    for shift, byte in enumerate(b for b in range(256) if b not in chars):
        chars[byte] = chr(256 + shift)
    return {char: byte for byte, char in chars.items()}
