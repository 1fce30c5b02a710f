"""OpenGVLab's conversation templates: how InternVL's own `chat()` writes a prompt, for checkpoints
whose tokenizer has no chat template (config.json names the template: `"template": "internvl2_5"`).

Every template vlmd knows is the "MPT" separator style of OpenGVLab's conversation module:

    system_template.format(system_message) + sep
    + for each turn: role + message + sep
    + the assistant's role, left open for the answer

An image is written `<image>` followed by a newline where it stands in a message (InternVL's
`chat()` puts `<image>\\n` before the question); the tokenizer actor expands it to
`<img>` + `<IMG_CONTEXT>` x N + `</img>`. Generation stops at the separator's token (`sep`
stripped), which is what `chat()` passes as the EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"

# The system prompts InternVL's chat() sends by default (config.json may not override them:
# OpenGVLab's released modeling code takes the template's).
_INTERNVL2_5_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
_INTERNVL2_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"


@dataclass(frozen=True)
class Conversation:
    """One template: the system turn's format and default message, each role's prefix, and the
    separator after every turn."""

    name: str
    system_template: str
    system_message: str
    user: str
    assistant: str
    sep: str

    @property
    def stop_token(self) -> str:
        """The token that ends an answer (what InternVL's chat() stops on)."""
        return self.sep.strip()

    def render(self, messages: list[dict]) -> str:
        """The prompt for `messages` (OpenAI roles; content a string or a list of
        `{"type": "text", "text": ...}` / `{"type": "image"}` parts), open for the assistant's
        answer. System messages replace the default system message (joined by newlines). An
        empty message is its role alone, as OpenGVLab's get_prompt writes it."""
        systems = [flatten_content(m["content"]) for m in messages if m["role"] == "system"]
        system = "\n".join(systems) if systems else self.system_message
        prompt = self.system_template.format(system_message=system) + self.sep
        prefixes = {"user": self.user, "assistant": self.assistant}
        for message in messages:
            if message["role"] != "system":
                text = flatten_content(message["content"])
                prompt += prefixes[message["role"]] + (text + self.sep if text else "")
        return prompt + self.assistant


def flatten_content(content: str | list[dict]) -> str:
    """A message's content as one string, each image written `<image>` + newline where it is."""
    if isinstance(content, str):
        return content
    return "".join(IMAGE_PLACEHOLDER + "\n" if part["type"] == "image" else part["text"] for part in content)


def _chatml(name: str, system_message: str, sep: str) -> Conversation:
    return Conversation(
        name=name,
        system_template="<|im_start|>system\n{system_message}",
        system_message=system_message,
        user="<|im_start|>user\n",
        assistant="<|im_start|>assistant\n",
        sep=sep,
    )


# "Hermes-2" and "internlm2-chat" separate turns with <|im_end|> alone, no newline: that is how
# InternVL 2 was trained and how its chat() prompts, so it is kept.
CONVERSATIONS = {
    conv.name: conv
    for conv in (
        _chatml("internvl2_5", _INTERNVL2_5_SYSTEM, "<|im_end|>\n"),
        _chatml("Hermes-2", _INTERNVL2_SYSTEM, "<|im_end|>"),
        _chatml("internlm2-chat", _INTERNVL2_SYSTEM, "<|im_end|>"),
        Conversation(
            name="phi3-chat",
            system_template="<|system|>\n{system_message}",
            system_message=_INTERNVL2_SYSTEM,
            user="<|user|>\n",
            assistant="<|assistant|>\n",
            sep="<|end|>",
        ),
    )
}
