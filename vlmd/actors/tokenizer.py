"""The tokenizer actor's work: prompt ids with image placeholders expanded, stop sequences,
detokenization. It lives in the http process (the architecture allows them to share one).

Each image becomes `<img>` + `<IMG_CONTEXT>` x (tiles x image tokens per tile) + `</img>`,
exactly what transformers' InternVL processor produces. A LightLLM-style prompt may spell the
placeholder three ways, one per image, in order: LightLLM's `<img></img>`, `<image>`, and
`<IMG_CONTEXT>` as the HF chat template writes it. A chat (OpenAI messages) is rendered by the
model's chat template, and only the placeholder the template writes for an image part counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from transformers import AutoTokenizer


class PromptError(ValueError):
    """The prompt does not fit its images (or the server's limits)."""


@dataclass(frozen=True)
class ImageSpan:
    token_offset: int  # index of the first <IMG_CONTEXT> token
    num_tokens: int


class PromptBuilder:
    def __init__(self, model_dir: str, image_seq_length: int) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.image_seq_length = image_seq_length
        self.start_token = getattr(self.tokenizer, "start_image_token", "<img>")
        self.end_token = getattr(self.tokenizer, "end_image_token", "</img>")
        self.context_token = getattr(self.tokenizer, "context_image_token", "<IMG_CONTEXT>")
        self.start_id, self.end_id, self.context_id = self.tokenizer.convert_tokens_to_ids(
            [self.start_token, self.end_token, self.context_token]
        )
        self.image_tokens = (self.start_token, self.end_token, self.context_token)
        spellings = [self.start_token + self.end_token, "<image>", self.context_token]
        self._placeholder = re.compile("|".join(re.escape(s) for s in spellings))
        self._template_placeholder = re.compile(re.escape(self.context_token))
        self._byte_values = _byte_level_alphabet()
        self._token_bytes: dict[int, bytes] = {}

    def build(self, text: str, tiles_per_image: list[int]) -> tuple[list[int], list[ImageSpan]]:
        """Token ids of `text` with one image expanded per placeholder."""
        segments = self._placeholder.split(text)
        if len(segments) - 1 != len(tiles_per_image):
            raise PromptError(
                f"the prompt has {len(segments) - 1} image placeholder(s) (<img></img>, <image> or "
                f"{self.context_token}) but the request carries {len(tiles_per_image)} image(s)"
            )
        return self._expand(segments, tiles_per_image)

    def render_chat(self, messages: list[dict]) -> str:
        """The chat template's text for `messages`, ready for the assistant's answer. Content
        parts are `{"type": "text", "text": ...}` or `{"type": "image"}`; the template writes a
        placeholder where each image is. The text parts must not contain image tokens."""
        if not self.tokenizer.chat_template:
            raise PromptError("the model has no chat template: use /v1/completions or /generate")
        for message in messages:
            content = message["content"]
            texts = [content] if isinstance(content, str) else [p.get("text", "") for p in content]
            if any(token in text for text in texts for token in self.image_tokens):
                raise PromptError(
                    f"the text of the messages must not contain image tokens ({', '.join(self.image_tokens)}): "
                    "send images as image_url parts"
                )
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def build_chat(self, text: str, tiles_per_image: list[int]) -> tuple[list[int], list[ImageSpan]]:
        """Token ids of a rendered chat with one image expanded per template placeholder."""
        segments = self._template_placeholder.split(text)
        if len(segments) - 1 != len(tiles_per_image):
            raise PromptError(
                f"the model's chat template placed {len(segments) - 1} image(s) of the "
                f"{len(tiles_per_image)} in the messages"
            )
        return self._expand(segments, tiles_per_image)

    def _expand(self, segments: list[str], tiles_per_image: list[int]) -> tuple[list[int], list[ImageSpan]]:
        num_placeholders = len(segments) - 1
        ids: list[int] = []
        spans: list[ImageSpan] = []
        for i, segment in enumerate(segments):
            # Placeholders expand to special tokens, which the tokenizer never merges across, so
            # encoding the text between them piece by piece gives the ids of the whole string.
            ids += self.tokenizer.encode(segment, add_special_tokens=i == 0) if segment or i == 0 else []
            if i < num_placeholders:
                num_tokens = tiles_per_image[i] * self.image_seq_length
                ids.append(self.start_id)
                spans.append(ImageSpan(len(ids), num_tokens))
                ids += [self.context_id] * num_tokens
                ids.append(self.end_id)
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
        """The bytes a token stands for (part of a UTF-8 character, for some byte-level tokens)."""
        cached = self._token_bytes.get(token_id)
        if cached is None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if token_id not in self.tokenizer.added_tokens_decoder and all(
                char in self._byte_values for char in piece
            ):
                cached = bytes(self._byte_values[char] for char in piece)
            else:  # an added token, or not a byte-level vocabulary
                cached = self.token_text(token_id).encode()
            self._token_bytes[token_id] = cached
        return cached


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE writes each byte as a printable character (GPT-2's map): the inverse."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars = {byte: chr(byte) for byte in printable}
    for shift, byte in enumerate(b for b in range(256) if b not in chars):
        chars[byte] = chr(256 + shift)
    return {char: byte for byte, char in chars.items()}
