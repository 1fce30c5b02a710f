"""The tokenizer actor's work: prompt ids with image placeholders expanded, stop sequences,
detokenization. It lives in the http process (the architecture allows them to share one).

Each image becomes `<img>` + `<IMG_CONTEXT>` x (tiles x image tokens per tile) + `</img>`,
exactly what transformers' InternVL processor produces. Three placeholder spellings are
accepted, one per image, in order: LightLLM's `<img></img>`, `<image>`, and `<IMG_CONTEXT>` as
the HF chat template writes it.
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
        spellings = [self.start_token + self.end_token, "<image>", self.context_token]
        self._placeholder = re.compile("|".join(re.escape(s) for s in spellings))

    def build(self, text: str, tiles_per_image: list[int]) -> tuple[list[int], list[ImageSpan]]:
        """Token ids of `text` with one image expanded per placeholder."""
        segments = self._placeholder.split(text)
        num_placeholders = len(segments) - 1
        if num_placeholders != len(tiles_per_image):
            raise PromptError(
                f"the prompt has {num_placeholders} image placeholder(s) (<img></img>, <image> or "
                f"{self.context_token}) but the request carries {len(tiles_per_image)} image(s)"
            )
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
